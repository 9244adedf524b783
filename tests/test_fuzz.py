"""Fuzzing the boundaries where input enters: the CLI's flags, the config importers, and the keyword
arguments of `make_config` / `build_model` / `plan` / `Workload`. Whatever comes in, the answer is a result
or one clear line (ValueError; exit 2), never another exception, a traceback or a changed input file.

Bounded: a fixed number of examples each (FUZZ_EXAMPLES scales them), small models only where a model is
built or traced. Set FUZZ_REPORT=1 to print how many inputs each fuzzer tried and how many it refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.build import build_model
from model.config import make_config
from planner.cli import main
from planner.config_import import import_hf_config_json, import_training_yaml
from planner.plan import plan
from planner.workload import Workload

SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
TRIED: Counter = Counter()
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, int(examples * SCALE)))

NASTY_TEXT = ["", " ", "0", "-1", "1", "2", "3", "16", "1e308", "-1e308", "inf", "-inf", "nan", "1.5", "abc", ",",
              "0,0", "1,,2", "9" * 40, "\n", "=1+1", "ünïcödé", "../x", "%0A", "1e-300", "4,4,0", "64", "1024",
              "100000"]
number_text = st.one_of(st.sampled_from(NASTY_TEXT), st.integers(-10**6, 10**12).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr))

# Each command with its flags (value-taking); switches are drawn apart. Sizes stay small where the command
# builds or traces a model, so each example costs milliseconds to a few seconds.
COMMANDS = {
    "table": (["--sizes", "debug,tiny"], ["--experts", "--top-k", "--router-hidden-dim", "--vocab-size",
                                          "--expert-capacity", "--context-length", "--prediction-length",
                                          "--batch-size", "--num-samples", "--architectures", "--dtype",
                                          "--precision", "--optimizer", "--dispatch", "--format"]),
    "breakdown": (["--sizes", "debug"], ["--experts", "--top-k", "--context-length", "--batch-size",
                                         "--expert-capacity"]),
    "solve": (["--size", "debug", "--target-total", "5M", "--limit", "2M", "--max-experts", "16"],
              ["--target-total", "--limit", "--max-top-k", "--router-widths", "--token-blocks", "--tolerance",
               "--top", "--budget", "--context-length"]),
    "plan": (["--config", "{config}"], ["--devices", "--gpu", "--device-memory-gib", "--output"]),
    "run": (["--size", "debug", "--steps", "10"], ["--experts", "--top-k", "--devices", "--global-batch",
                                                    "--per-device-batch", "--accumulation", "--context-length",
                                                    "--price-per-hour", "--gpu", "--precision", "--strategy",
                                                    "--data-series-per-s"]),
    "serve": (["--size", "debug", "--series", "1000", "--max-batch", "4"], ["--series", "--deadline-hours", "--num-samples",
                                                        "--batch-size", "--max-batch", "--gpu", "--dtype"]),
    "bench": (["--sizes", "debug", "--predict-for", "h100-sxm", "--experts", "0"],
              ["--top-k", "--context-length", "--prediction-length", "--num-samples", "--batch-size",
               "--expert-capacity", "--modes", "--output"]),
}
TRAINING_YAML = "model_id: amazon/chronos-t5-tiny\ncontext_length: 64\nprediction_length: 16\n"


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    fixed, flags = COMMANDS[command]
    chosen = draw(st.lists(st.sampled_from(flags), max_size=3, unique=True))
    argv = [command, *fixed]
    for flag in chosen:
        value = draw(st.one_of(number_text, st.sampled_from(["{config}", "{folder}", "h100-sxm", "zero3", "bf16"])))
        argv += [flag, value]
    return argv


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO())), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


@fuzz(60)
@given(argv=command_lines())
def test_cli_flags_give_a_result_or_one_line(argv, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "train.yaml"
    config.write_text(TRAINING_YAML)
    argv = [part.replace("{config}", str(config)).replace("{folder}", str(folder)) for part in argv]
    with contextlib.chdir(folder):  # a relative --output lands in the example's folder, not the checkout
        status, err = _run_cli(argv)
    TRIED["cli"] += 1
    assert status in (0, 1, 2), (argv, status, err)
    if status == 2:
        TRIED["cli refused"] += 1
        lines = [line for line in err.splitlines() if not line.startswith("note:")]
        assert len(lines) == 1 and "Traceback" not in err and "error" in lines[0], (argv, err)
    if "--config" in argv:
        assert config.read_text() == TRAINING_YAML  # the input is never written over


scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   st.sampled_from(NASTY_TEXT), st.text(max_size=30))
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                          inner, max_size=3),
                     max_leaves=6)
YAML_KEYS = ["model_id", "model_type", "context_length", "prediction_length", "n_tokens", "use_moe", "num_experts",
             "num_active_experts", "router_hidden_dim", "load_balancing_weight", "expert_capacity",
             "moe_architecture", "per_device_train_batch_size", "gradient_accumulation_steps", "num_samples",
             "optim", "bf16", "fp16", "tf32", "max_steps", "torch_compile", "shared_layers", "random_key"]
GOOD = {"model_id": "amazon/chronos-t5-tiny", "use_moe": True, "moe_architecture": "token_ffn",
        "num_experts": 8, "bf16": True}


@fuzz(300)
@given(settings_=st.dictionaries(st.sampled_from(YAML_KEYS), st.one_of(value, st.sampled_from(list(GOOD.values()))),
                                 max_size=8),
       keep_model_id=st.booleans())
def test_training_yaml_gives_a_config_or_one_line(settings_, keep_model_id):
    if keep_model_id:
        settings_ = {"model_id": "amazon/chronos-t5-tiny", **settings_}
    text = yaml.safe_dump(settings_, allow_unicode=True)
    TRIED["yaml"] += 1
    try:
        imported = import_training_yaml(text)
    except ValueError as error:
        TRIED["yaml refused"] += 1
        assert "\n" not in str(error) and len(str(error)) < 1000
        return
    assert imported.workload.batch_size >= 1 and imported.config.dims.d_model >= 1


@fuzz(200)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_raw_text_as_yaml_or_json_gives_one_line(text):
    TRIED["raw text"] += 1
    for reader in (import_training_yaml, import_hf_config_json):
        try:
            reader(text)
        except ValueError as error:
            assert "\n" not in str(error).strip()


T5_KEYS = ["model_type", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size"]
T5 = {"model_type": "t5", "d_model": 64, "d_ff": 256, "d_kv": 16, "num_heads": 4, "num_layers": 2}


@fuzz(300)
@given(changes=st.dictionaries(st.sampled_from(T5_KEYS), value, max_size=4))
def test_config_json_gives_a_config_or_one_line(changes):
    TRIED["config.json"] += 1
    try:
        text = json.dumps({**T5, **changes})
    except ValueError:  # NaN keys and the like that JSON cannot hold
        return
    try:
        import_hf_config_json(text)
    except ValueError as error:
        TRIED["config.json refused"] += 1
        assert "\n" not in str(error)


CONFIG_KWARGS = {"architecture": st.sampled_from(["token_ffn", "expert_only", "shared_then_expert", "x"]),
                 "num_experts": scalar, "top_k": scalar, "router_hidden_dim": scalar, "vocab_size": scalar,
                 "expert_capacity": scalar, "dispatch": st.sampled_from(["sparse", "dense", "other"]),
                 "load_balancing_weight": scalar, "encoder_moe_blocks": value, "decoder_moe_blocks": value}
WORKLOAD_KWARGS = {"batch_size": scalar, "context_length": scalar, "prediction_length": scalar,
                   "num_samples": scalar, "dtype": st.sampled_from(["fp32", "bf16", "int8", "x"]),
                   "optimizer": st.sampled_from(["adamw", "sgd", "x"]), "precision": st.sampled_from(["fp32", "x"])}


@fuzz(400)
@given(config_kwargs=st.fixed_dictionaries({}, optional=CONFIG_KWARGS),
       workload_kwargs=st.fixed_dictionaries({}, optional=WORKLOAD_KWARGS))
def test_config_and_workload_kwargs_give_a_plan_or_one_line(config_kwargs, workload_kwargs):
    TRIED["kwargs"] += 1
    try:
        config = make_config("debug", **config_kwargs)
        workload = Workload(**workload_kwargs)
        result = plan(config, workload, size="debug")
    except ValueError as error:
        TRIED["kwargs refused"] += 1
        assert "\n" not in str(error)
        return
    assert result.params.total_params > 0


@fuzz(40)
@given(config_kwargs=st.fixed_dictionaries({}, optional=CONFIG_KWARGS))
def test_build_model_builds_or_gives_one_line(config_kwargs):
    TRIED["build_model"] += 1
    try:
        model = build_model("debug", **config_kwargs)
    except ValueError as error:
        TRIED["build_model refused"] += 1
        assert "\n" not in str(error)
        return
    assert sum(p.numel() for p in model.parameters()) > 0


def teardown_module() -> None:
    if os.environ.get("FUZZ_REPORT"):
        print("\nfuzz inputs tried:", dict(TRIED))
        Path(os.environ.get("FUZZ_REPORT_FILE", "/dev/null")).write_text(json.dumps(dict(TRIED)))
