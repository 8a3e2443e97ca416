"""Try it: the prompt as the run saw its training rows (its format file or the model's chat template), and the
model's answer, greedy or sampled with a seed so that an answer can be reproduced."""

from __future__ import annotations

from .datafiles import load_format, render
from .errors import DashboardError
from .home import resolve_user_path

TEMPLATE_NONE = "none"
TEMPLATE_FORMAT = "format"
TEMPLATE_CHAT = "chat"


def apply_format(format_name: str, instruction: str) -> str:
    """The prompt as the run saw its training rows: the format's instruction template filled in and cut
    where the output would begin (so the model writes the output)."""
    fmt = load_format(resolve_user_path(format_name, "format"))
    candidates = [(fields, template) for fields, _, template in fmt.entries
                  if "instruction" in fields and "%output%" in template]
    if not candidates:
        raise DashboardError(f"The format {format_name} has no template with %instruction% and %output%.")
    exact = [c for c in candidates if c[0] == {"instruction", "output"}]
    fields, template = (exact or sorted(candidates, key=lambda c: len(c[0])))[0]
    before_output = template[: template.index("%output%")]
    return render(before_output, {name: "" for name in fields} | {"instruction": instruction})


def apply_chat_template(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DashboardError("This model has no chat template.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def template_choices(format_name: str, tokenizer) -> dict[str, str]:
    """The prompt templates a run offers, by key, with their labels: none, the run's format, the chat template."""
    choices = {TEMPLATE_NONE: "No template: the prompt as typed"}
    if format_name:
        choices[TEMPLATE_FORMAT] = f"The run's format ({format_name}), instruction filled in"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        choices[TEMPLATE_CHAT] = "The model's chat template (user turn)"
    return choices


def full_prompt(template: str, prompt: str, format_name: str = "", tokenizer=None) -> str:
    """The prompt the model is given for one of `template_choices`."""
    if template == TEMPLATE_FORMAT:
        return apply_format(format_name, prompt)
    if template == TEMPLATE_CHAT:
        return apply_chat_template(tokenizer, prompt)
    return prompt


def visible_answer(text: str) -> str:
    """An answer as shown: one of only spaces or newlines is named, with its characters, instead of blank."""
    return text if text.strip() else f"(no visible text: {text!r})"


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The model's continuation of the prompt (new text only). Temperature 0: greedy, the same every time;
    above 0: sampling, reproducible for a given seed."""
    import torch
    from transformers import GenerationConfig

    if not prompt:
        raise DashboardError("The prompt is empty.")
    if max_new_tokens < 1:
        raise DashboardError("Max new tokens must be at least 1.")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=sample, temperature=float(temperature) if sample else None,
        top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(int(seed))
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=config)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def base_and_adapter_answers(models, adapter_dir, tokenizer, prompt: str, max_new_tokens: int = 64,
                             temperature: float = 0.0, seed: int = 0) -> dict[str, str]:
    """The answers of the base model ("base") and of the adapter ("adapter") to one prompt, with the same
    settings and seed, from one copy of the base model (a trainer.adapters.BaseWithAdapters)."""
    answers = {}
    for label, folder in (("base", None), ("adapter", adapter_dir)):
        with models.using(folder) as model:
            answers[label] = generate_text(model, tokenizer, prompt, max_new_tokens, temperature, seed)
    return answers
