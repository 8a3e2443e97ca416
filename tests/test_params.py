"""TrainingParameters: round trips, webui-style values, validation naming the field, and robustness."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.errors import DashboardError
from trainer.params import FIELDS, OPTIMIZERS, SCHEDULERS, TrainingParameters, decode_escapes, label

VALID = dict(lora_name="my-lora_1", dataset="dashboard-instructions", format="alpaca-format")


def valid(**changes) -> TrainingParameters:
    return TrainingParameters(**{**VALID, **changes})


def error_of(params: TrainingParameters, require_name: bool = True) -> DashboardError:
    with pytest.raises(DashboardError) as info:
        params.validate(require_name)
    return info.value


# ---------------------------------------------------------------------------------------------
# Round trips


def test_defaults_validate_once_named_and_given_data():
    params = valid()
    assert params.validate() is params
    assert params.problems() == []
    assert error_of(TrainingParameters()).field in ("lora_name", "dataset")


def test_round_trip_through_dict_and_file(tmp_path):
    params = valid(learning_rate=1e-4, cutoff_len=512, overlap_len=64, hard_cut_string="###", add_bos_token=True,
                   target_modules="custom", custom_target_modules="q_proj, gate_proj", epochs=1.5,
                   train_only_after="Assistant:", lr_scheduler_type="cosine", seed=123, max_steps=7)
    data = params.to_dict()
    assert set(data) == set(FIELDS)
    assert TrainingParameters.from_dict(data) == params
    assert TrainingParameters.from_dict(json.loads(json.dumps(data))) == params
    path = tmp_path / "training_parameters.json"
    params.write(path)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert TrainingParameters.from_file(path) == params
    assert [p.name for p in tmp_path.iterdir()] == ["training_parameters.json"]  # no temp file left


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_round_trip_of_random_valid_values(data):
    values = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        kind = f.type
        if meta.get("choices"):
            values[name] = data.draw(st.sampled_from(meta["choices"]))
        elif kind == "bool":
            values[name] = data.draw(st.booleans())
        elif kind == "int":
            values[name] = data.draw(st.integers(int(meta["min"]), int(meta["max"])))
        elif kind == "float":
            values[name] = data.draw(st.floats(meta["min"], meta["max"], allow_nan=False))
        else:
            # "None" in a path field is the webui's "nothing chosen" and reads back as "" (see test_webui_none_means_not_chosen).
            values[name] = data.draw(st.text(max_size=20).filter(lambda text: text not in ("None", "none")))
    params = TrainingParameters.from_dict(values)
    assert params.to_dict() == values
    assert TrainingParameters.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_from_file_errors(tmp_path):
    with pytest.raises(DashboardError, match="No training parameters"):
        TrainingParameters.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope", encoding="utf-8")
    with pytest.raises(DashboardError, match="not valid JSON"):
        TrainingParameters.from_file(bad)
    bad.write_bytes(b'{"lora_name": "caf\xe9"}')
    with pytest.raises(DashboardError, match="not valid JSON"):
        TrainingParameters.from_file(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DashboardError, match="must be a JSON object"):
        TrainingParameters.from_file(bad)


# ---------------------------------------------------------------------------------------------
# Webui-style values


def test_reads_webui_style_values():
    data = {
        "lora_name": "webui-lora", "always_override": False, "save_steps": 0.0, "micro_batch_size": "4",
        "batch_size": 128, "epochs": "3", "learning_rate": "3e-4", "lr_scheduler_type": "linear",
        "lora_rank": "32", "lora_alpha": 64.0, "lora_dropout": "0.05", "cutoff_len": "256", "dataset": "alpaca-data",
        "format": "alpaca-format", "eval_steps": 100.0, "overlap_len": 128, "newline_favor_len": "128",
        "warmup_steps": 100.0, "optimizer": "adamw_torch", "hard_cut_string": "\\n\\n\\n", "train_only_after": "",
        "stop_at_loss": 0, "add_eos_token": "false", "add_bos_token": "true", "min_chars": 0.0,
        "higher_rank_limit": False, "report_to": "None",
        "q_proj_en": True, "v_proj_en": True, "k_proj_en": False, "o_proj_en": False,
        "gate_proj_en": False, "down_proj_en": False, "up_proj_en": False,
    }
    params = TrainingParameters.from_dict(data)
    assert params.learning_rate == 3e-4 and isinstance(params.learning_rate, float)
    assert params.cutoff_len == 256 and isinstance(params.cutoff_len, int)
    assert params.micro_batch_size == 4 and params.lora_rank == 32 and params.lora_alpha == 64
    assert params.save_steps == 0 and isinstance(params.save_steps, int)
    assert params.epochs == 3.0 and params.lora_dropout == 0.05
    assert params.add_eos_token is False and params.add_bos_token is True
    assert params.target_modules == "q-v"
    assert params.lora_target_modules() == ["q_proj", "v_proj"]
    assert params.hard_cut == "\n\n\n"
    assert params.validate() is params
    assert params.gradient_accumulation_steps == 32
    # Its warm-up and eval steps count micro-batches: 100 of them are ceil(100 / 32) optimiser steps here.
    assert (params.warmup_steps, params.eval_steps) == (4, 4)


@pytest.mark.parametrize("flags, choice, custom", [
    ({"q_proj_en": "true", "k_proj_en": "true", "v_proj_en": "True", "o_proj_en": True}, "q-k-v-o", ""),
    ({"q_proj_en": True, "v_proj_en": True, "gate_proj_en": True, "k_proj_en": False}, "custom",
     "q_proj,v_proj,gate_proj"),
    ({"q_proj_en": True, "v_proj_en": "false"}, "custom", "q_proj"),
])
def test_webui_target_flags(flags, choice, custom):
    params = TrainingParameters.from_dict({**VALID, **flags})
    assert params.target_modules == choice
    assert params.custom_target_modules == custom
    params.validate()


def test_explicit_target_modules_beat_webui_flags():
    params = TrainingParameters.from_dict({**VALID, "target_modules": "all-linear", "q_proj_en": True})
    assert params.target_modules == "all-linear"


# The current webui's keys (its Training tab since March 2026), mapped by trainer/webui.py
CURRENT_WEBUI = {"lora_name": "new-webui", "all_linear": True, "q_proj_en": True, "v_proj_en": True,
                 "k_proj_en": False, "micro_batch_size": 4, "batch_size": 4, "dataset": "None", "format": "None",
                 "text_dataset": "None", "stride_length": 256, "excess_length": "drop", "always_override": True,
                 "report_to": "wandb", "cutoff_len": 512}


@pytest.mark.parametrize("changes, choice, custom", [
    ({}, "all-linear", ""),  # all_linear ignores the ticked flags, as the webui does
    ({"all_linear": "true"}, "all-linear", ""),
    ({"all_linear": False}, "q-v", ""),
    ({"all_linear": "false", "k_proj_en": True, "o_proj_en": True}, "q-k-v-o", ""),
    ({"all_linear": False, "up_proj_en": True, "down_proj_en": True}, "custom", "q_proj,v_proj,up_proj,down_proj"),
    ({"all_linear": False, "q_proj_en": False, "v_proj_en": False}, "custom", ""),
])
def test_current_webui_target_modules(changes, choice, custom):
    params = TrainingParameters.from_dict({**CURRENT_WEBUI, "dataset": "chat", **changes})
    assert (params.target_modules, params.custom_target_modules) == (choice, custom)
    if not custom and choice == "custom":  # nothing ticked: the webui refuses to start, and so does the form
        assert [p.field for p in params.problems()] == ["custom_target_modules"]


@pytest.mark.parametrize("format_value, chat_template", [
    ("ChatML", "ChatML"), ("Custom template", "Custom template"), ("Chat Template", ""), ("None", ""),
])
def test_the_current_webuis_format_names_an_instruction_template(format_value, chat_template):
    params = TrainingParameters.from_dict({**CURRENT_WEBUI, "dataset": "chat", "format": format_value})
    assert (params.format, params.chat_template) == ("", chat_template)


def test_an_older_webuis_format_is_a_format_file_and_our_own_keys_win():
    old = {"lora_name": "old", "q_proj_en": True, "v_proj_en": True, "always_override": False,
           "dataset": "alpaca-data", "format": "alpaca-format", "overlap_len": 64}
    params = TrainingParameters.from_dict(old)
    assert (params.format, params.chat_template, params.overlap_len) == ("alpaca-format", "", 64)
    ours = TrainingParameters.from_dict({**CURRENT_WEBUI, "dataset": "chat", "format": "ChatML", "chat_template":
                                         "Mistral", "overlap_len": 16, "overlong_samples": "truncate"})
    assert (ours.chat_template, ours.overlap_len, ours.overlong_samples) == ("Mistral", 16, "truncate")


def test_a_webui_text_dataset_is_a_text_rows_dataset_chunked_as_there(home):
    params = TrainingParameters.from_dict({**CURRENT_WEBUI, "text_dataset": "dashboard-instructions",
                                           "stride_length": 64, "excess_length": "truncate"})
    # The bare webui name becomes the file the lists show; the stride is the overlap; cuts fall at exact token
    # counts there, so no newline favour and no hard cut string.
    assert params.dataset == "dashboard-instructions.json" and params.raw_text_file == ""
    assert (params.overlap_len, params.newline_favor_len, params.hard_cut_string) == (64, 0, "")
    assert params.overlong_samples == "truncate" and params.problems() == []
    chosen = TrainingParameters.from_dict({**CURRENT_WEBUI, "dataset": "chat", "text_dataset": "texts"})
    assert chosen.dataset == "chat" and chosen.newline_favor_len == 128  # a chat dataset (no such file here) wins
    missing = TrainingParameters.from_dict({**CURRENT_WEBUI, "eval_dataset": "no-such-file"})
    assert missing.eval_dataset == "no-such-file"  # left for the trainer to say it is not found


def test_webui_step_counts_become_optimiser_steps():
    base = {**CURRENT_WEBUI, "dataset": "chat", "save_steps": 10.0, "warmup_steps": 100.0, "eval_steps": 50}
    assert [getattr(TrainingParameters.from_dict({**base, "batch_size": 32}), name)
            for name in ("save_steps", "warmup_steps", "eval_steps")] == [2, 13, 7]
    assert TrainingParameters.from_dict({**base, "batch_size": 4}).warmup_steps == 100  # no accumulation
    with pytest.raises(DashboardError) as info:
        TrainingParameters.from_dict({**base, "batch_size": 32, "warmup_steps": "soon"})
    assert info.value.field == "warmup_steps"


@pytest.mark.parametrize("optimizer, ours", [
    ("adamw_torch_fused", "adamw_torch"), ("adamw_hf", "adamw_torch"), ("adamw_bnb_8bit", "adamw_bnb_8bit"),
    ("adagrad", "adagrad"),  # no such optimiser here: refused with the choices
])
def test_webui_optimisers(optimizer, ours):
    params = TrainingParameters.from_dict({**CURRENT_WEBUI, "dataset": "chat", "optimizer": optimizer})
    assert params.optimizer == ours
    assert [p.field for p in params.problems()] == ([] if ours in OPTIMIZERS else ["optimizer"])


def test_reading_a_webui_file_keeps_none_of_its_keys_and_reading_again_changes_nothing():
    from trainer.webui import WEBUI_ONLY_KEYS, is_webui_parameters, read_webui_parameters

    data = {**CURRENT_WEBUI, "dataset": "chat", "format": "ChatML", "batch_size": 32, "warmup_steps": 100}
    mapped = read_webui_parameters(data)
    assert not is_webui_parameters(mapped) and not set(WEBUI_ONLY_KEYS) & set(mapped)
    assert not [key for key in mapped if key.endswith("_proj_en")]
    assert read_webui_parameters(mapped) == mapped and data["format"] == "ChatML"  # the input is left as it was
    once = TrainingParameters.from_dict(data)
    assert TrainingParameters.from_dict(once.to_dict()) == once
    ours = valid().to_dict()
    assert read_webui_parameters(ours) == ours


@pytest.mark.parametrize("name, value", [
    ("learning_rate", "fast"), ("learning_rate", [3e-4]), ("cutoff_len", "12.5"), ("cutoff_len", True),
    ("cutoff_len", 3.5), ("add_eos_token", "maybe"), ("add_eos_token", 2), ("lora_name", {"a": 1}),
    ("epochs", "three"), ("seed", "1e999"),
])
def test_unreadable_values_name_their_field(name, value):
    with pytest.raises(DashboardError) as info:
        TrainingParameters.from_dict({**VALID, name: value})
    assert info.value.field == name
    assert label(name) in info.value.message and name not in info.value.message  # the label, not the code name


def test_escapes_of_the_hard_cut_string():
    assert decode_escapes("\\n\\n\\n") == "\n\n\n"
    assert decode_escapes("a\\tb\\\\n\\q") == "a\tb\\n\\q"
    assert decode_escapes("###") == "###"


# ---------------------------------------------------------------------------------------------
# Validation names the field


def test_overlap_only_matters_for_raw_text():
    assert valid(cutoff_len=64, overlap_len=128).problems() == []


@pytest.mark.parametrize("changes, field", [
    (dict(dataset="", raw_text_file="guide.txt", cutoff_len=128, overlap_len=128), "overlap_len"),
    (dict(dataset="", raw_text_file="guide.txt", cutoff_len=128, overlap_len=500), "overlap_len"),
    (dict(batch_size=6, micro_batch_size=4), "batch_size"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=math.nan), "learning_rate"),
    (dict(epochs=math.inf), "epochs"),
    (dict(cutoff_len=4, overlap_len=0), "cutoff_len"),
    (dict(optimizer="sgdx"), "optimizer"),
    (dict(lr_scheduler_type="warp"), "lr_scheduler_type"),
    (dict(overlong_samples="keep"), "overlong_samples"),
    (dict(target_modules="custom", custom_target_modules=" , "), "custom_target_modules"),
    (dict(dataset="", raw_text_file=""), "dataset"),
    (dict(raw_text_file="guide.txt"), "raw_text_file"),
    (dict(base_model="  "), "base_model"),
])
def test_validation_errors_name_the_field(changes, field):
    params = valid(**changes)
    error = error_of(params)
    assert error.field == field
    assert [p.field for p in params.problems()] == [field]


@pytest.mark.parametrize("name", ["../x", ".git", "CON", "con.txt", "LPT1", "a/b", "a\\b", "", "   ", "x\x00y",
                                  "semi;colon", "x" * 101])
def test_bad_lora_names(name):
    error = error_of(valid(lora_name=name))
    assert error.field == "lora_name"
    # the preview does not need a name
    valid(lora_name=name).validate(require_name=False)


@pytest.mark.parametrize("name", ["my-lora", "My LoRA 2", "v1.0_final", "x" * 100])
def test_good_lora_names(name):
    valid(lora_name=name).validate()


def test_every_problem_is_reported_at_once():
    params = valid(dataset="", raw_text_file="guide.txt", lora_rank=0, overlap_len=300, cutoff_len=256, batch_size=5, micro_batch_size=2)
    fields = [p.field for p in params.problems()]
    assert set(fields) == {"lora_rank", "overlap_len", "batch_size"}
    error = error_of(params)
    assert error.field == fields[0]
    assert "LoRA rank" in error.message and "Overlap" in error.message and "Batch size" in error.message


# ---------------------------------------------------------------------------------------------
# Robustness: anything JSON can hold either loads and validates or raises DashboardError


json_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=12)
                | st.sampled_from(["3e-4", "256", "-1", "0", "1.0", "true", "false", "True", "nan", "inf", "-inf",
                                   "1e999", " 7 ", "", "None", "0x10", "1_000"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
field_names = st.sampled_from(sorted(FIELDS) + ["q_proj_en", "v_proj_en", "k_proj_en", "gate_proj_en", "nope",
                                                "all_linear", "text_dataset", "stride_length", "excess_length",
                                                "always_override"])
choice_values = st.sampled_from(SCHEDULERS + OPTIMIZERS + ["q-v", "custom", "all-linear", "drop", "4bit", "nf4"])


def check_loads_or_dashboard_error(data) -> None:
    try:
        params = TrainingParameters.from_dict(data)
    except DashboardError as exc:
        assert exc.message
        return
    for require_name in (True, False):
        try:
            params.validate(require_name)
        except DashboardError as exc:
            assert exc.field is None or exc.field in FIELDS
            assert exc.message
    for problem in params.problems(require_name=False):
        assert problem.field in FIELDS


@settings(max_examples=300, deadline=None)
@given(data=json_values)
def test_any_json_value_loads_or_raises_dashboard_error(data):
    check_loads_or_dashboard_error(data)


@settings(max_examples=500, deadline=None)
@given(data=st.dictionaries(field_names, json_values | choice_values, max_size=12))
def test_any_values_for_the_real_fields_load_or_raise_dashboard_error(data):
    check_loads_or_dashboard_error(data)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FIELDS)), value=json_values)
def test_a_bad_value_names_its_field(name, value):
    try:
        params = TrainingParameters.from_dict({**VALID, name: value})
    except DashboardError as exc:
        assert exc.field == name
        return
    for problem in params.problems():
        assert problem.field in FIELDS


def test_huge_integers_are_a_dashboard_error():
    params = TrainingParameters.from_dict({**VALID, "cutoff_len": 10**400})
    with pytest.raises(DashboardError) as info:
        params.validate()
    assert info.value.field == "cutoff_len"


def test_webui_none_means_not_chosen():
    params = TrainingParameters.from_dict({"lora_name": "x", "dataset": "None", "format": "None",
                                           "eval_dataset": "None", "raw_text_file": "guide.txt"})
    assert params.dataset == "" and params.format == "" and params.eval_dataset == ""
    assert params.is_raw_text
    params.validate()


def test_fields_have_metadata():
    for f in dataclasses.fields(TrainingParameters):
        assert f.metadata["help"] and f.metadata["group"] and f.metadata["label"]
        assert "_" not in f.metadata["label"], "a label reads as words, not as the code name"
        if f.type in ("int", "float"):
            assert f.metadata["format"].startswith("%")
    labels = [f.metadata["label"] for f in dataclasses.fields(TrainingParameters)]
    assert len(set(labels)) == len(labels)


def test_the_sample_shaping_options_are_the_data_options():
    from trainer.params import SAMPLE_OPTIONS

    assert SAMPLE_OPTIONS == ["dataset", "format", "raw_text_file", "cutoff_len", "overlap_len", "newline_favor_len",
                              "hard_cut_string", "min_chars", "train_only_after", "add_eos_token", "add_bos_token",
                              "overlong_samples", "chat_template", "train_last_turn_only"]


def test_overlap_counts_the_bos_and_eos_tokens_the_options_ask_for():
    raw = dict(dataset="", raw_text_file="guide.txt", cutoff_len=128, add_eos_token=True, add_bos_token=False)
    [problem] = valid(overlap_len=127, **raw).problems()
    assert problem.field == "overlap_len" and "BOS/EOS" in problem.message and "(127)" in problem.message
    assert valid(overlap_len=127, **{**raw, "add_eos_token": False}).problems() == []
    assert valid(overlap_len=126, **raw).problems() == []


# ---------------------------------------------------------------------------------------------
# What cannot train is refused before the start (trainer/batching.py), with a fix that works


def test_warmup_ratio_is_a_fraction_of_at_most_a_half():
    assert valid(warmup_ratio=0.5).problems() == []
    problem = error_of(valid(warmup_ratio=0.6))
    assert problem.field == "warmup_ratio" and problem.message == "Warmup ratio must be at most 0.5; got 0.6."
    assert TrainingParameters.from_dict({"warmup_ratio": "0.1"}).warmup_ratio == 0.1
    assert TrainingParameters.from_dict({}).warmup_ratio == 0.0  # stored runs keep their warm-up steps


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_offered_batch_fits_and_is_the_largest_that_does(world):
    from trainer.batching import batch_fit_problem, fitting_batch
    from trainer.params import batch_problem

    for n_units in range(1, 25):
        for micro in range(1, 6):
            for batch in range(micro * world, 40, micro * world):
                params = valid(micro_batch_size=micro, batch_size=batch)
                problem = batch_fit_problem(params, n_units, world)
                assert (problem is None) == (n_units >= batch)
                if problem is None:
                    continue
                assert problem.field == "batch_size" and f"Only {n_units} sample" in problem.message
                new_micro, new_batch, processes = fitting_batch(n_units, micro, world)
                assert 0 < new_batch <= n_units and new_micro <= micro and processes <= world
                assert batch_problem(new_batch, new_micro, processes) is None
                assert batch_fit_problem(valid(micro_batch_size=new_micro, batch_size=new_batch), n_units,
                                         processes) is None
                if processes == world and new_micro == micro:
                    assert new_batch + micro * world > n_units  # no larger multiple fits


def test_a_warm_up_as_long_as_the_run_is_refused_and_the_offered_fixes_work():
    from trainer.batching import warmup_problem, warmup_steps_for

    for total in range(1, 40):
        for steps in range(0, 45):
            params = valid(warmup_steps=steps)
            problem = warmup_problem(params, total)
            assert (problem is None) == (steps < total)
            if problem is None:
                continue
            assert problem.field == "warmup_steps" and f"Set warmup steps below {total}" in problem.message
            assert warmup_problem(valid(warmup_steps=total - 1), total) is None
            if "warmup ratio to 0.1" in problem.message:
                fixed = valid(warmup_steps=steps, warmup_ratio=0.1)
                assert warmup_problem(fixed, total) is None
                assert f"({warmup_steps_for(fixed, total)} of {total} steps)" in problem.message
    assert warmup_problem(valid(warmup_steps=100, lr_scheduler_type="constant"), 5) is None  # no warm-up there
    one_step = warmup_problem(valid(warmup_ratio=0.2), 1)
    assert one_step.field == "warmup_ratio" and one_step.message.endswith("Set warmup ratio to 0.")


def test_a_learning_rate_above_1e_2_is_a_warning_with_the_usual_range():
    from trainer.batching import start_warnings

    assert start_warnings(valid(learning_rate=1e-2)) == []
    (warning,) = start_warnings(valid(learning_rate=0.03))
    assert warning.field == "learning_rate" and warning.message == (
        "Learning rate 0.03 is far above what LoRA tolerates: LoRA usually trains at 1e-5 to 5e-4; 0.03 will likely "
        "make the loss blow up.")


def test_no_sample_left_names_the_field_to_change(home, tokenizer):
    from trainer.batching import start_problems
    from trainer.data import build_samples

    params = valid(train_only_after="### Nowhere:", skip_unmatched_rows=True)  # 2 of its rows match no key
    preview = build_samples(params, tokenizer)
    assert preview.samples == []
    (problem,) = start_problems(params, preview, 0, 1, 1)
    assert problem.field == "train_only_after"  # what most rows say, not the first unmatched one
    assert problem.message.startswith("No sample to train on: every row was unmatched or dropped")
    assert problem.message.endswith("Set train only after to a string the rendered rows contain, or leave it empty.")
    unmatched_too = start_problems(valid(train_only_after="### Nowhere:"), preview, 0, 1, 1)
    assert [p.field for p in unmatched_too] == ["skip_unmatched_rows", "train_only_after"]
