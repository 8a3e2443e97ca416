"""Samples are built once per content and read back identical; any change of content builds them afresh."""

from __future__ import annotations

import json

from trainer.data import build_samples
from trainer.params import TrainingParameters
from trainer.samplecache import cache_dir, cached_build_samples


def raw_params(**changes) -> TrainingParameters:
    return TrainingParameters.from_dict({"raw_text_file": "user-guide.txt", "cutoff_len": 64, "overlap_len": 16,
                                         **changes})


def formatted_params(**changes) -> TrainingParameters:
    return TrainingParameters.from_dict({"dataset": "dashboard-instructions.json", "format": "alpaca-format",
                                         "cutoff_len": 128, "train_only_after": "### Response:", **changes})


def test_a_second_build_reads_the_same_samples_from_the_cache(home, tokenizer):
    for params in (raw_params(), formatted_params()):
        first, hit = cached_build_samples(params, tokenizer)
        assert not hit
        second, hit = cached_build_samples(params, tokenizer)
        assert hit
        assert second == first == build_samples(params, tokenizer)  # samples, problems and statistics
    assert len(list(cache_dir().glob("*.npz"))) == 2
    assert cache_dir().is_relative_to(home)


def test_changed_content_or_options_are_built_afresh(home, tokenizer):
    params = formatted_params()
    cached_build_samples(params, tokenizer)
    # A changed option.
    assert not cached_build_samples(formatted_params(cutoff_len=96), tokenizer)[1]
    # A changed byte in the dataset, under the same name: the new row is in the samples.
    path = home / "datasets" / "dashboard-instructions.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    rows[0]["output"] = "A changed answer."
    path.write_text(json.dumps(rows), encoding="utf-8")
    preview, hit = cached_build_samples(params, tokenizer)
    assert not hit and "A changed answer." in preview.samples[0].text
    # A changed format file.
    fmt = home / "formats"
    fmt.mkdir(exist_ok=True)
    (fmt / "alpaca-format.json").write_text(json.dumps({"instruction,output": "Q: %instruction%\n### Response: %output%"}))
    preview, hit = cached_build_samples(params, tokenizer)
    assert not hit and preview.samples[0].text.startswith("Q: ")


def test_a_damaged_entry_is_rebuilt(home, tokenizer):
    params = raw_params()
    expected, _ = cached_build_samples(params, tokenizer)
    (entry,) = cache_dir().glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])
    preview, hit = cached_build_samples(params, tokenizer)
    assert not hit and preview == expected
    assert cached_build_samples(params, tokenizer)[1]  # and the rebuilt entry is good again


def test_the_data_page_previews_through_the_cache_the_trainer_reads(home, tokenizer):
    from streamlit.testing.v1 import AppTest

    from trainer.home import CODE_ROOT

    at = AppTest.from_file(str(CODE_ROOT / "views" / "data.py"), default_timeout=60)
    at.run()
    at.number_input(key="dp_cutoff_len").set_value(64)
    at.number_input(key="dp_overlap_len").set_value(16).run()
    assert not at.exception, at.exception
    preview, hit = cached_build_samples(raw_params(), tokenizer)  # the options a run of the same data stores
    assert hit and preview == build_samples(raw_params(), tokenizer)
