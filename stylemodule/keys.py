"""Metric keys: the names under which losses and metrics are logged and reported.

TensorBoard, the progress bar, checkpoints' callback metrics and Ray Tune all read
these constants, because a misspelt key only produces a warning.
"""

LOSS_TOTAL = "loss/total"
LOSS_CONTENT = "loss/content"
LOSS_STYLE = "loss/style"
LOSS_TV = "loss/tv"
METRIC_MAE = "metric/mae"
METRIC_SSIM = "metric/ssim"
METRIC_PSNR = "metric/psnr"

# Ray Tune's names for the values each trial reports at every evaluation. Evaluations on
# image steps and the trial's final report add SSIM and PSNR (TUNE_FINAL).
TUNE_MAE = "mae"
TUNE_STEP = "step"
TUNE_REPORTED = {
    TUNE_MAE: METRIC_MAE,
    "loss": LOSS_TOTAL,
    "content_loss": LOSS_CONTENT,
    "style_loss": LOSS_STYLE,
}
TUNE_FINAL = {**TUNE_REPORTED, "ssim": METRIC_SSIM, "psnr": METRIC_PSNR}


def style_layer_loss(layer: str) -> str:
    """Key of one style layer's unweighted loss, such as `loss/style/relu3_1`."""
    return f"{LOSS_STYLE}/{layer}"

# Search-space parameter holding one uniform(0, 1) draw per style layer; the trainable
# maps the draws to style_layer_weights on the simplex.
SIMPLEX_KEY = "style_layer_weights_simplex"

# MAE reported for a trial whose loss went non-finite: worse than any real MAE, since
# those lie in [0, 1].
WORST_MAE = 1.0e9
