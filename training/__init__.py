"""PanGu-π DeepSpeed trainer, data pipeline, fine-tuning and evaluation, installed as `pangu_pi.training`."""

if __name__ == "training":  # the folder imported by its old top-level name, from a checkout
    import warnings

    warnings.warn(
        "the `training` package is now `pangu_pi.training`: import pangu_pi.training "
        "(python -m pangu_pi.training.MODULE for its commands)",
        FutureWarning,
        stacklevel=2,
    )
