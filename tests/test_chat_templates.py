"""Chat templates: the model's own by default, instruction templates (the shipped ones and the home's), masks
on assistant turns only (transformers' own masks where a template marks them with {% generation %}), and
end tokens: no sample ends in two of them, whether the template closes its turns with the EOS token, with
another end token, or not at all."""

from __future__ import annotations

import json

import pytest

from trainer.chattemplates import (chat_template_for, closing_ids, instruction_template_names,
                                   instruction_template_path, load_instruction_template)
from trainer.data import build_samples
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT

from tests.test_shapes import SYSTEM, TURNS, masked_text, params, trained_text, write_jsonl

SHIPPED = ["Alpaca", "ChatML", "Llama-v3", "Mistral", "Vicuna-v1.1"]
GENERATION = """instruction_template: |-
  {%- for message in messages -%}
    {%- if message['role'] == 'assistant' -%}
      {{- '<|im_start|>assistant\\n' -}}
      {%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}
      {{- '\\n' -}}
    {%- else -%}
      {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
    {%- endif -%}
  {%- endfor -%}
"""
# Turns closed by <|endoftext|>: an end token of the tokenizer that is not its EOS token (<|im_end|>).
OTHER_END = """instruction_template: |-
  {%- for message in messages -%}
    {{- message['role'] + ': ' + message['content'] + '<|endoftext|>' -}}
  {%- endfor -%}
  {%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}
"""
CHATS = [[*TURNS[:2]], [SYSTEM, *TURNS], [{"role": "user", "content": "Emoji 😀 and ünïcode?"},
                                         {"role": "assistant", "content": "Both 😀 fine, ünïcode too."}]]


def write_template(home, name: str, text: str) -> str:
    folder = home / "instruction-templates"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def chats(home, name: str = "chats.jsonl") -> str:
    return write_jsonl(home, name, [{"messages": m} for m in CHATS])


def ends_in_two_end_tokens(tokenizer, sample) -> bool:
    """Whether the last two tokens that are not whitespace are both end tokens."""
    ends = closing_ids(tokenizer)
    shown = [t for t in sample.input_ids if tokenizer.decode([t]).strip() or t in ends]
    return len(shown) >= 2 and shown[-1] in ends and shown[-2] in ends


# ---------------------------------------------------------------------------------------------
# Which template


def test_the_shipped_instruction_templates_load_and_render(home, tokenizer):
    assert set(SHIPPED) <= set(instruction_template_names())
    name = chats(home)
    for template in SHIPPED:
        path = instruction_template_path(template)
        assert path.parent == CODE_ROOT / "instruction-templates"
        assert "messages" in load_instruction_template(path)
        preview = build_samples(params(dataset=name, chat_template=template), tokenizer)
        assert preview.problems == [] and len(preview.samples) == len(CHATS), template
        assert f"rendered with the instruction template {template}, assistant turns trained" in preview.shape
        for chat, sample in zip(CHATS, preview.samples):
            trained, masked = trained_text(tokenizer, sample), masked_text(tokenizer, sample)
            for message in chat:
                if message["role"] == "assistant":
                    assert message["content"] in trained, (template, trained)
                else:
                    assert message["content"] in masked and message["content"] not in trained, template
            assert not ends_in_two_end_tokens(tokenizer, sample), template


def test_the_models_own_template_is_the_default(home, tokenizer):
    template = chat_template_for(tokenizer)
    assert template.text == tokenizer.chat_template and template.label == "the model's chat template"
    preview = build_samples(params(dataset=chats(home)), tokenizer)
    assert preview.samples[0].text == tokenizer.apply_chat_template(CHATS[0], tokenize=False)
    assert "rendered with the model's chat template" in preview.shape


def test_a_model_without_a_chat_template_asks_for_an_instruction_template(home, default_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(default_model_dir)
    bare.chat_template = None
    name = chats(home)
    preview = build_samples(params(dataset=name), bare)
    assert preview.samples == [] and len(preview.problems) == len(CHATS)
    assert all("has no chat template; choose an instruction template" in p.reason for p in preview.problems)
    assert preview.stats["chat_rows_skipped"] == len(CHATS)
    chosen = build_samples(params(dataset=name, chat_template="ChatML"), bare)
    assert len(chosen.samples) == len(CHATS) and chosen.problems == []
    assert chosen.samples[0].text == ("<|im_start|>user\nWhat does the overlap length do?<|im_end|>\n"
                                      "<|im_start|>assistant\nIt makes consecutive chunks share tokens.<|im_end|>\n")


def test_the_homes_instruction_templates_come_first_and_resolve_by_name(home, tokenizer):
    write_template(home, "ChatML", OTHER_END)
    write_template(home, "Mine", OTHER_END)
    names = instruction_template_names()
    assert names.index("Mine") < names.index("Alpaca") and names.count("ChatML") == 1
    assert instruction_template_path("ChatML") == home / "instruction-templates" / "ChatML.yaml"
    preview = build_samples(params(dataset=chats(home), chat_template="Mine"), tokenizer)
    assert preview.samples[0].text.startswith("user: What does the overlap length do?<|endoftext|>assistant: ")


@pytest.mark.parametrize("text, message", [
    ("instruction_template: [unclosed", "is not valid YAML at line 1"),
    ("context: 'old webui format'\nturn_template: '<|user|>'\n", "has no 'instruction_template' key"),
    ("instruction_template: '{% for m in messages %}{{ m.content }'\n", "is not a valid Jinja template"),
])
def test_broken_instruction_templates_are_named(home, tokenizer, text, message):
    write_template(home, "Broken", text)
    with pytest.raises(DashboardError, match=message) as caught:
        build_samples(params(dataset=chats(home), chat_template="Broken"), tokenizer)
    assert "Broken.yaml" in caught.value.message


def test_an_unknown_instruction_template_lists_the_known_ones(home, tokenizer):
    with pytest.raises(DashboardError, match="Instruction template not found: Nope.*Alpaca"):
        build_samples(params(dataset=chats(home), chat_template="Nope"), tokenizer)


# ---------------------------------------------------------------------------------------------
# End tokens


def test_a_template_closing_turns_with_the_eos_token_gets_no_second_one(home, tokenizer):
    name = chats(home)
    for template in ("", "ChatML"):
        with_eos = build_samples(params(dataset=name, chat_template=template, add_eos_token=True), tokenizer)
        without = build_samples(params(dataset=name, chat_template=template, add_eos_token=False), tokenizer)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        for sample, plain in zip(with_eos.samples, without.samples):
            assert sample.input_ids == plain.input_ids and sample.label_mask == plain.label_mask
            assert sample.input_ids[-2:] == [tokenizer.eos_token_id, *newline]
            assert sample.input_ids[-3] != tokenizer.eos_token_id
            assert sample.label_mask[-2] == 1  # the turn's own end token is trained
            assert not ends_in_two_end_tokens(tokenizer, sample)
        assert "already ends with an end token of its own, so no EOS (<|im_end|>) is added" in with_eos.shape
        assert with_eos.stats["eos_from_template"] == len(CHATS)


def test_a_template_not_closing_its_turns_gets_one_eos(home, tokenizer):
    name = chats(home)
    with_eos = build_samples(params(dataset=name, chat_template="Alpaca", add_eos_token=True), tokenizer)
    without = build_samples(params(dataset=name, chat_template="Alpaca", add_eos_token=False), tokenizer)
    for sample, plain in zip(with_eos.samples, without.samples):
        assert sample.input_ids == plain.input_ids + [tokenizer.eos_token_id]
        assert sample.label_mask == plain.label_mask + [1]
        assert sample.input_ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.eos_token_id not in plain.input_ids
    assert "The EOS token <|im_end|> is added at the end of each sample." in with_eos.shape


def test_a_template_closing_turns_with_another_end_token_gets_no_eos(home, tokenizer):
    write_template(home, "OtherEnd", OTHER_END)
    preview = build_samples(params(dataset=chats(home), chat_template="OtherEnd", add_eos_token=True), tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for sample in preview.samples:
        assert sample.input_ids[-1] == end != tokenizer.eos_token_id and sample.label_mask[-1] == 1
        assert tokenizer.eos_token_id not in sample.input_ids


def test_no_chat_sample_ends_in_two_end_tokens(home, tokenizer):
    write_template(home, "OtherEnd", OTHER_END)
    rows = [{"messages": m} for m in CHATS] + [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"prompt": [TURNS[0]], "completion": [TURNS[1]]},
        {"prompt": "Say it ends<|im_end|>", "completion": " here.<|im_end|>"}]
    name = write_jsonl(home, "all.jsonl", rows)
    for template in ["", *SHIPPED, "OtherEnd"]:
        for add_eos in (True, False):
            preview = build_samples(params(dataset=name, chat_template=template, add_eos_token=add_eos), tokenizer)
            assert len(preview.samples) == len(rows), (template, preview.problems)
            assert not [s.source for s in preview.samples if ends_in_two_end_tokens(tokenizer, s)], template


def test_a_bos_token_the_template_writes_is_not_added_again(home, tokenizer):
    # SmolLM2's BOS token is <|im_start|>, which ChatML writes at the start of every chat.
    name = chats(home)
    with_bos = build_samples(params(dataset=name, add_bos_token=True), tokenizer)
    without = build_samples(params(dataset=name, add_bos_token=False), tokenizer)
    assert [s.input_ids for s in with_bos.samples] == [s.input_ids for s in without.samples]
    assert all(s.input_ids[0] == tokenizer.bos_token_id and s.input_ids[1] != tokenizer.bos_token_id
               for s in with_bos.samples)
    alpaca = build_samples(params(dataset=name, chat_template="Alpaca", add_bos_token=True), tokenizer)
    assert all(s.input_ids[0] == tokenizer.bos_token_id and s.label_mask[0] == 0 for s in alpaca.samples)


# ---------------------------------------------------------------------------------------------
# {% generation %} templates


@pytest.mark.parametrize("add_eos", [True, False])
def test_generation_blocks_give_transformers_assistant_masks(home, tokenizer, add_eos):
    import yaml

    write_template(home, "Gen", GENERATION)
    template = yaml.safe_load(GENERATION)["instruction_template"]
    preview = build_samples(params(dataset=chats(home), chat_template="Gen", add_eos_token=add_eos), tokenizer)
    assert len(preview.samples) == len(CHATS)
    for chat, sample in zip(CHATS, preview.samples):
        expected = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert sample.input_ids == expected["input_ids"]
        assert sample.label_mask == expected["assistant_masks"]
        assert sum(sample.label_mask) > 0


def test_generation_blocks_with_the_last_turn_only(home, tokenizer):
    import yaml

    write_template(home, "Gen", GENERATION)
    template = yaml.safe_load(GENERATION)["instruction_template"]
    name = write_jsonl(home, "multi.jsonl", [{"messages": TURNS}])
    sample = build_samples(params(dataset=name, chat_template="Gen", train_last_turn_only=True), tokenizer).samples[0]
    expected = tokenizer.apply_chat_template(TURNS, chat_template=template, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    assert sample.input_ids == expected["input_ids"]
    assert trained_text(tokenizer, sample) == "No chunk crosses it.<|im_end|>"
    trained = [i for i, m in enumerate(sample.label_mask) if m]
    assert all(expected["assistant_masks"][i] for i in trained) and sum(expected["assistant_masks"]) > len(trained)


# ---------------------------------------------------------------------------------------------
# The sample cache follows the template


def test_the_sample_cache_key_follows_the_template_choice_and_its_file(home, tokenizer):
    from trainer.samplecache import cached_build_samples, samples_key

    name = chats(home)
    write_template(home, "Mine", OTHER_END)
    keys = {template: samples_key(params(dataset=name, chat_template=template), tokenizer)
            for template in ("", "ChatML", "Mine")}
    assert len(set(keys.values())) == 3
    write_template(home, "Mine", OTHER_END.replace("': '", "' -> '"))
    assert samples_key(params(dataset=name, chat_template="Mine"), tokenizer) != keys["Mine"]
    options = params(dataset=name, chat_template="Mine")
    built, cached = cached_build_samples(options, tokenizer)
    again, cached_again = cached_build_samples(options, tokenizer)
    assert (cached, cached_again) == (False, True)
    assert again.shape == built.shape and "instruction template Mine" in again.shape
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in built.samples]
    assert json.loads(json.dumps(again.to_json())) == json.loads(json.dumps(built.to_json()))
