"""PanGu-π the vLLM plugin and the OpenAI-compatible server, installed as `pangu_pi.serving`."""

if __name__ == "serving":  # the folder imported by its old top-level name, from a checkout
    import warnings

    warnings.warn(
        "the `serving` package is now `pangu_pi.serving`: import pangu_pi.serving "
        "(python -m pangu_pi.serving.MODULE for its commands)",
        FutureWarning,
        stacklevel=2,
    )
