"""The `hatrt` command line: one click group; each command stays thin and calls library code.

Commands: `inspect` (KV-cache and FLOP accounting, exporter/costs.py). Others (export, check,
generate) are added to the `main` group.
"""

from __future__ import annotations

import json
import re

import click

from exporter.config import ConfigError, ModelConfig

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class TokenCount(click.ParamType):
    """A positive token count: 1048576, 1,048,576, 1M, 128K, 1.5M, 2^20 or 2**20 (K/M/G = 2^10/20/30)."""

    name = "N"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            text = str(value).strip().replace(",", "").replace("_", "")
            n = None
            power = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", text)
            plain = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)\s*([kKmMgG]?)", text)
            if power:
                n = int(power.group(1)) ** int(power.group(2))
            elif plain:
                x = float(plain.group(1)) * _SUFFIX[plain.group(2).upper()]
                if x == int(x):
                    n = int(x)
            if n is None:
                self.fail(f"{value!r} is not a token count (try 1048576, 1M, 128K or 2^20)", param, ctx)
        if n <= 0:
            self.fail(f"{value!r}: the context must be a positive number of tokens", param, ctx)
        return n


def load_model_config(preset_name: str | None, config_path: str | None) -> ModelConfig:
    """Exactly one of --preset / --config -> ModelConfig; click usage errors (exit code 2)."""
    from exporter.presets import preset

    if preset_name is not None and config_path is not None:
        raise click.UsageError(f"give either --preset or --config, not both (got --preset "
                               f"{preset_name!r} and --config {config_path!r})")
    if preset_name is None and config_path is None:
        raise click.UsageError("give a model: --preset NAME or --config PATH (config.json)")
    try:
        if preset_name is not None:
            return preset(preset_name)
        return ModelConfig.from_json(config_path)  # type: ignore[arg-type]
    except ConfigError as e:
        hint = "'--preset'" if preset_name is not None else "'--config'"
        raise click.BadParameter(str(e), param_hint=hint) from None


def model_options(f):
    """--preset / --config, shared by every command that needs a model configuration."""
    f = click.option("--config", "config_path", metavar="PATH",
                     help="A Hugging Face config.json of a DeepSeek-V4 model.")(f)
    f = click.option("--preset", "preset_name", metavar="NAME",
                     help="A built-in configuration (v4-flash, v4-pro, tiny-*).")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hatrt: tools for DeepSeek-V4 hybrid-attention models."""


@main.command()
@model_options
@click.option("--context", "-n", type=TokenCount(), default=2**20, show_default="1048576 (1M)",
              help="Context length N in tokens: 1048576, 1M, 128K, 2^20.")
@click.option("--indexer-format", type=click.Choice(["fp4", "fp8"]), default="fp4",
              show_default=True, help="Storage format of the CSA indexer keys.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(preset_name: str | None, config_path: str | None, context: int, indexer_format: str,
            as_json: bool) -> None:
    """KV-cache bytes and FLOPs per generated token at context N, vs DeepSeek-V3.2 and a dense
    GQA-8 baseline (one sequence; method: docs/cost-model.md)."""
    from exporter.costs import format_report, model_costs

    cfg = load_model_config(preset_name, config_path)
    costs = model_costs(cfg, context, indexer_format)
    if as_json:
        click.echo(json.dumps(costs.to_dict(), indent=2))
    else:
        click.echo(format_report(costs))


if __name__ == "__main__":
    main()
