"""Your own model in the engine: `--model MODULE:FACTORY [--model-args JSON]`, or a model given to `fastvae.fit`.

A factory is called as `FACTORY(data_shape, **model_args)`, with `data_shape` the data set's sample shape (a
tuple of ints, e.g. (1, 28, 28)), and returns a `fastvae.VAE` for that shape. A run records where its model
came from in config.json: "model_source" is "built-in" (--arch), "factory" ("model" holds MODULE:FACTORY and
"model_args" the JSON object, so a resume, `fastvae.evaluate` and `fastvae.load_run` import the factory and
call it again) or "in-process" (a model or factory given to `fastvae.fit` that cannot be imported by name:
"model_class" names its class, and a resume or `load_run` needs it passed again).

Trust: only a string of the MODULE:ATTR form (dotted identifiers) is imported, with importlib; nothing else of
a config is executed, and the weights are loaded with `weights_only`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fastvae.model import VAE
from fastvae.options import ConfigError, build_model

Factory = Callable[..., VAE]
GivenModel = VAE | Factory

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")
"""The only form of `--model` (and of config.json's "model"): MODULE:ATTR, each dotted identifiers."""

BUILT_IN_ONLY = ("arch", "hidden", "latent_dim", "likelihood", "sigma")
"""The options of the built-in models, which `--model` (and a model given to `fastvae.fit`) refuses."""


def check_spec(spec: object) -> tuple[str, str]:
    """A MODULE:ATTR string -> (module, attribute path); anything else is a ConfigError (nothing imported)."""
    match = SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(
            f"--model {spec!r} is not of the form MODULE:FACTORY (dotted Python identifiers, e.g. "
            "mypackage.models:make_vae); nothing was imported"
        )
    return match.group(1), match.group(2)


def import_factory(spec: str) -> Factory:
    """The callable that the MODULE:ATTR string `spec` names, imported with importlib; ConfigError in one
    line when it cannot be imported (the exception its import raised, first line) or is not callable."""
    module_name, attr = check_spec(spec)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (any error of the user's module: one line)
        raise ConfigError(f"--model {spec}: cannot import {module_name}: {_first_line(err)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a callable factory")
    return obj


def spec_of(factory: object) -> str | None:
    """MODULE:ATTR of `factory` when importing it by that name gives it back (a function or class defined at
    a module's top level, not in __main__); else None."""
    module_name, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or module_name == "__main__":
        return None
    spec = f"{module_name}:{qualname}"
    if SPEC.fullmatch(spec) is None:  # e.g. <lambda> or a function defined in another's <locals>
        return None
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return spec if obj is factory else None


def class_name(model: VAE) -> str:
    """The model's class as module.QualName (recorded in config.json's "model_class")."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_model(model: object, data_shape: Sequence[int], what: str) -> VAE:
    """`model` must be a fastvae.VAE for samples of `data_shape`; `what` names it in the ConfigError."""
    if not isinstance(model, VAE):
        raise ConfigError(f"{what} must be a fastvae.VAE, got {type(model).__name__}")
    if tuple(model.data_shape) != tuple(data_shape):
        raise ConfigError(
            f"{what} has data_shape {tuple(model.data_shape)}, but the data's samples have shape {tuple(data_shape)}"
        )
    return model


def call_factory(factory: Factory, name: str, data_shape: Sequence[int], model_args: dict[str, Any]) -> VAE:
    """`factory(data_shape, **model_args)`, checked: a ConfigError in one line (`name` names the factory) when
    it raises or returns anything but a fastvae.VAE for `data_shape`."""
    shape = tuple(int(d) for d in data_shape)
    call = f"{name}({shape}{''.join(f', {k}={v!r}' for k, v in model_args.items())})"
    try:
        model = factory(shape, **model_args)
    except Exception as err:  # noqa: BLE001 (any error of the user's factory: one line)
        raise ConfigError(f"--model {call} raised {_first_line(err)}") from None
    return check_model(model, shape, f"--model {call} returned a {type(model).__name__}: it")


def model_args_of(value: object) -> dict[str, Any]:
    """--model-args (or config.json's "model_args"): a JSON object (keyword arguments), {} for None."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ConfigError(f"--model-args must be a JSON object of keyword arguments, got {json.dumps(value)}")
    return value


def check_own_model_options(args: argparse.Namespace, explicit: set[str], given: GivenModel | None) -> None:
    """With --model (or a model given to `fastvae.fit`): the built-in models' options are refused, in one
    line naming those given; --model-args needs a factory."""
    if args.resume is not None:
        return  # the run's own settings (resume_settings compares what was given anew)
    own = args.model is not None or given is not None
    if own:
        refused = [f"--{d.replace('_', '-')}" for d in BUILT_IN_ONLY if d in explicit]
        if refused:
            raise ConfigError(
                f"{' and '.join(refused)} apply to the built-in models only; your own model (--model) sets "
                f"{'them' if len(refused) > 1 else 'it'} itself: leave {'them' if len(refused) > 1 else 'it'} out"
            )
    factory = args.model is not None or (given is not None and not isinstance(given, VAE))
    if "model_args" in explicit and not factory:
        raise ConfigError("--model-args applies to --model MODULE:FACTORY (a factory) only")
    model_args_of(args.model_args)
    if args.model is not None:
        import_factory(args.model)  # fail before the data load


def model_settings(model: VAE, source: str, spec: str | None, model_args: dict[str, Any]) -> dict[str, Any]:
    """The config.json entries of an own model: where it came from and what the instance reports (its
    likelihood, sigma and latent size K and shape, for the summary, the evaluation and the pictures)."""
    return {
        "model_source": source,
        "model": spec,
        "model_args": model_args,
        "model_class": class_name(model),
        "arch": model.arch,
        "hidden": None,
        "latent_dim": model.latent_dim,
        "latent_shape": list(model.latent_shape),
        "likelihood": model.likelihood,
        "sigma": model.sigma,
    }


def run_model(config: dict[str, Any], data_shape: Sequence[int], given: GivenModel | None = None) -> VAE:
    """The model of the run `config` describes, on the CPU (or where a given instance is), its ops running
    with the config's impl: built from the config (built-in), imported and called (factory), or `given`
    (a VAE instance is used as it is, a factory is called). ConfigError in one line when that fails."""
    source = config.get("model_source") or ("factory" if config.get("model") else "built-in")
    if isinstance(given, VAE):
        model = check_model(given, data_shape, "the model given to fastvae.fit")
    elif given is not None:
        name = spec_of(given) or getattr(given, "__qualname__", type(given).__name__)
        model = call_factory(given, name, data_shape, model_args_of(config.get("model_args")))
    elif source == "factory":
        spec = config.get("model")
        model = call_factory(import_factory(spec), spec, data_shape, model_args_of(config.get("model_args")))
    elif source == "in-process":
        raise ConfigError(
            f"the run's model ({config.get('model_class', 'a fastvae.VAE')}) was given in-process to fastvae.fit, "
            "so it cannot be rebuilt by name: pass it, as in fastvae.fit(model, data, resume=RUN_DIR) or "
            "fastvae.load_run(RUN_DIR, model=model)"
        )
    else:
        return build_model(config)
    model.impl = config["impl"]
    return model
