"""Chat templates: the model's own, or an instruction template, and a chat rendered into text with the
character spans of the assistant turns that are trained.

An instruction template is a text-generation-webui YAML file whose `instruction_template` key holds a Jinja
chat template (the same language as a tokenizer's `chat_template`). They are found in the home's
`instruction-templates/` (a webui's own) and in the ones shipped in the checkout's `instruction-templates/`
(ChatML, Llama-v3, Mistral, Alpaca, Vicuna-v1.1). The option's empty value means the model's own template.

The trained spans of a chat: where a template marks assistant turns with `{% generation %}`, exactly the
spans transformers reports for them (`apply_chat_template(..., return_assistant_tokens_mask=True)`); for any
other template, each assistant reply from the end of the chat rendered up to it with the generation prompt
to the end of the chat rendered with it, so the reply and the template's end of its turn are trained and
the prompt, the role headers and the other turns are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DashboardError
from .home import TEMPLATE_ENDINGS, instruction_templates_dirs, resolve_user_path

MODEL_TEMPLATE = ""  # the option's value for the model's own chat template
GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A special token that ends a turn or a text (<|im_end|>, <|eot_id|>, </s>, <end_of_turn>, <|endoftext|>).
_END_TOKEN_RE = re.compile(r"end|eot|eos|^</s>$", re.IGNORECASE)

Span = tuple[int, int]


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None  # the Jinja template; None: the model has none and none was chosen
    label: str  # what a person reads: "the model's chat template", "the instruction template ChatML"
    path: Path | None = None  # the instruction template's YAML file

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks assistant turns with {% generation %} (then transformers' masks are used)."""
        return bool(self.text and GENERATION_RE.search(self.text))


# ---- instruction templates ------------------------------------------------------------------------
def instruction_template_names() -> list[str]:
    """Instruction template names (file names without .yaml) in the home's folder and the shipped one, once each."""
    names: list[str] = []
    for folder in instruction_templates_dirs():
        if folder.is_dir():
            names += [p.stem for p in sorted(folder.iterdir()) if p.suffix.lower() in TEMPLATE_ENDINGS
                      and p.is_file() and not p.name.startswith(".")]
    return list(dict.fromkeys(names))


def instruction_template_path(name: str) -> Path:
    """The YAML file of an instruction template given by name (or path)."""
    path = resolve_user_path(name, "instruction template")
    if not path.is_file() or path.suffix.lower() not in TEMPLATE_ENDINGS:
        shown = ", ".join(instruction_template_names()[:8]) or "none"
        raise DashboardError(f"Instruction template not found: {name} (in instruction-templates/: {shown}).",
                             field="chat_template")
    return path


def load_instruction_template(path: Path) -> str:
    """The Jinja chat template of a webui instruction template file (its `instruction_template` key)."""
    import yaml

    from .datafiles import read_text_file

    path = Path(path)
    try:
        data = yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DashboardError(f"Instruction template {path.name} is not valid YAML{where}.",
                             field="chat_template") from None
    template = data.get("instruction_template") if isinstance(data, dict) else None
    if not isinstance(template, str) or not template.strip():
        raise DashboardError(f"Instruction template {path.name} has no 'instruction_template' key holding a Jinja "
                             f"chat template (a file in the webui's older turn_template format is not read).",
                             field="chat_template")
    return template


def chat_template_for(tokenizer, choice: str = MODEL_TEMPLATE) -> ChatTemplate:
    """The template chat rows are rendered with: the model's own (empty choice) or the named instruction
    template. A template that is not valid Jinja raises DashboardError naming it."""
    if not choice:
        text = getattr(tokenizer, "chat_template", None)
        return ChatTemplate(text if isinstance(text, str) and text.strip() else None, "the model's chat template")
    path = instruction_template_path(choice)
    template = ChatTemplate(load_instruction_template(path), f"the instruction template {path.stem}", path)
    _check_syntax(tokenizer, template)
    return template


def _check_syntax(tokenizer, template: ChatTemplate) -> None:
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template.text,
                                      tokenize=False)
    except TemplateSyntaxError as exc:
        raise DashboardError(f"{template.path.name if template.path else 'The chat template'} is not a valid "
                             f"Jinja template: {exc.message} (line {exc.lineno}).", field="chat_template") from None
    except Exception:  # noqa: BLE001 - a template may refuse a lone user turn; rows show their own errors
        pass


# ---- rendering a chat ---------------------------------------------------------------------------------
def trained_turns(messages: list[dict], first: int = 0, last_only: bool = False) -> list[int]:
    """Indices of the assistant messages that are trained: from `first` on (a prompt/completion row's
    completion), or only the last one."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    return turns[-1:] if last_only else turns


def render_chat(tokenizer, template: ChatTemplate, messages: list[dict],
                turns: list[int]) -> tuple[str, list[Span], str]:
    """The chat as text, the character spans of the trained turns, and how tokens map onto them: "overlap"
    (a token touching a span is trained, as transformers' assistant mask) or "start" (a token starting inside
    one). Raises ValueError with a reason for a row that cannot be used."""
    from jinja2 import TemplateError

    if template.text is None:
        raise ValueError("the model's tokenizer has no chat template; choose an instruction template "
                         "(Chat template option) such as ChatML")
    if not turns:
        raise ValueError("no assistant message to learn from")
    try:
        if template.marks_generation:
            text, spans = _generation_spans(tokenizer, template.text, messages, turns)
            rule = "overlap"
        else:
            text, spans = _prefix_spans(tokenizer, template.text, messages, turns)
            rule = "start"
    except TemplateError as exc:
        raise ValueError(f"{template.label} refused it: {exc}") from None
    if not spans:
        raise ValueError(f"{template.label} renders no assistant turn that can be found in the chat")
    return text, spans, rule


def _render(tokenizer, template: str, messages: list[dict], prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=prompt)


def _prefix_spans(tokenizer, template: str, messages: list[dict], turns: list[int]) -> tuple[str, list[Span]]:
    full = _render(tokenizer, template, messages)
    spans = []
    for i in turns:
        upto = _render(tokenizer, template, messages[: i + 1])
        if i:
            before = _render(tokenizer, template, messages[:i], prompt=True)
        else:
            # A chat that opens with the assistant: the template may still put a system prompt and the
            # assistant header first, which are not the reply. The reply starts at its content.
            at = upto.rfind(messages[i]["content"]) if messages[i]["content"] else -1
            before = upto[:at] if at >= 0 else None
        if before is not None and full.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
    return full, spans


def _generation_spans(tokenizer, template: str, messages: list[dict], turns: list[int]) -> tuple[str, list[Span]]:
    """The {% generation %} spans transformers finds, those of the trained turns only."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(conversations=[messages], chat_template=template,
                                              return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    text, spans = rendered[0], [tuple(span) for span in indices[0]]
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(spans) == len(assistants):  # one block per assistant turn: keep those of the trained turns
        return text, [span for span, i in zip(spans, assistants) if i in turns]
    # Otherwise keep the blocks after the chat rendered up to the first trained turn.
    start = len(_render(tokenizer, template, messages[: turns[0]])) if turns[0] else 0
    return text, [span for span in spans if span[1] > start]


def closing_ids(tokenizer) -> set[int]:
    """Tokens that end a turn: the EOS token and the special tokens named as ends (<|im_end|>, <|eot_id|>...).
    A sample whose trained text already ends in one gets no EOS added (no doubled end token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False) and _END_TOKEN_RE.search(str(getattr(token, "content", ""))):
            ids.add(token_id)
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids.discard(tokenizer.bos_token_id)
    return ids
