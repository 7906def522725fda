"""`--beam-runner` / `--beam-pipeline-options` checked before any work starts (Apache Beam is optional).

A build that would fail minutes in, after workers started, on a typo in a flag is refused up front instead:
Beam itself only warns about an option it does not know and drops it, which would silently run a
DirectRunner build with one worker where the user asked for many.
"""

from __future__ import annotations

import contextlib
import io
import shlex

from ctglip_jax.errors import ConfigError

INSTALL_HINT = "Apache Beam is not installed: pip install 'ctglip-jax[beam]'"


class BeamNotInstalled(ConfigError):
    def __init__(self):
        super().__init__("--beam-runner", INSTALL_HINT)


def import_beam():
    try:
        import apache_beam
    except ImportError:
        raise BeamNotInstalled() from None
    return apache_beam


def pipeline_setup(runner: str, options: str | None):
    """(runner, PipelineOptions) for TFDS's DownloadConfig; any problem raises ConfigError naming the flag."""
    import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import create_runner

    try:
        flags = shlex.split(options or "")
    except ValueError as e:
        raise ConfigError(
            "--beam-pipeline-options", f"cannot be split into flags ({e}): {options!r}"
        ) from None
    for previous, flag in zip([""] + flags, flags, strict=False):
        if not flag.startswith("--") and not (previous.startswith("--") and "=" not in previous):
            raise ConfigError("--beam-pipeline-options", f"expects --name=value flags, got {flag!r}")
    if not any(f.startswith("--default_sdk_harness_log_level") for f in flags):
        flags.append("--default_sdk_harness_log_level=WARNING")  # workers' INFO lines would bury the summary
    pipeline_options = PipelineOptions(flags)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text: the one line below says it
            known = pipeline_options.get_all_options(retain_unknown_options=False)
            everything = pipeline_options.get_all_options(retain_unknown_options=True)
    except SystemExit:  # argparse rejected a value (e.g. --direct_num_workers=two)
        raise ConfigError("--beam-pipeline-options", f"a value Beam cannot parse in {options!r}") from None
    unknown = sorted(set(everything) - set(known))
    if unknown:
        raise ConfigError("--beam-pipeline-options", f"Beam knows no option --{unknown[0]}")
    try:
        runner_object = create_runner(runner)
    except ValueError as e:
        raise ConfigError("--beam-runner", str(e).splitlines()[0]) from None
    except ImportError as e:  # e.g. DataflowRunner without apache-beam[gcp]
        raise ConfigError("--beam-runner", f"{runner} needs more of Beam installed ({e})") from None
    return runner_object, pipeline_options
