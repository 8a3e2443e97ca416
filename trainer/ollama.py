"""Ollama Modelfiles for an exported adapter: FROM the base GGUF plus ADAPTER, or FROM the merged GGUF, with the
run's chat template carried over.

Ollama writes chat templates in Go's text/template language, not Jinja, so a Jinja template cannot be
passed through. The families this project ships instruction templates for (ChatML, Llama 3, Mistral,
Alpaca, Vicuna) are recognised by their markers and written as Ollama's own templates for them; for any
other template the Modelfile has no TEMPLATE line, and Ollama takes the chat template stored in the GGUF
file (tokenizer.chat_template), which llama.cpp's converter copies from the model.
"""

from __future__ import annotations

from pathlib import Path

# (marker in the Jinja template, Go template, stop strings), first match wins.
FAMILIES = {
    "ChatML": ("<|im_start|>",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ["<|im_end|>"]),
    "Llama 3": ("<|start_header_id|>",
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>"]),
    "Mistral": ("[INST]",
                '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}', ["[INST]"]),
    "Alpaca": ("### Instruction:",
               '{{- range .Messages }}{{- if eq .Role "system" }}{{ .Content }}\n\n'
               '{{- else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
               "{{- else }}### Response:\n{{ .Content }}\n\n{{- end }}{{- end }}### Response:\n",
               ["### Instruction:"]),
    "Vicuna": ("ASSISTANT:",
               '{{- range .Messages }}{{- if eq .Role "system" }}{{ .Content }}\n\n'
               '{{- else if eq .Role "user" }}USER: {{ .Content }}\n'
               "{{- else }}ASSISTANT: {{ .Content }}</s>\n{{- end }}{{- end }}ASSISTANT:", ["USER:"]),
}


def template_family(jinja: str | None) -> str | None:
    """Which of FAMILIES a Jinja chat template is, by its markers; None when it is none of them."""
    for family, (marker, _, _) in FAMILIES.items():
        if jinja and marker in jinja:
            return family
    return None


def modelfile(base: Path, adapter: Path | None, jinja_template: str | None, title: str) -> str:
    """A Modelfile: FROM `base` (an absolute path, or a file beside the Modelfile), ADAPTER when given, and the
    chat template as Ollama's own template when its family is known."""
    def where(path: Path) -> str:
        return str(path) if path.is_absolute() else f"./{path}"

    lines = [f"# {title}", "# Import it:  ollama create NAME -f THIS_FILE   then chat:  ollama run NAME",
             f"FROM {where(base)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {where(adapter)}")
    family = template_family(jinja_template)
    if family is None:
        lines.append("# No TEMPLATE line: Ollama uses the chat template stored in the GGUF file.")
    else:
        _, template, stops = FAMILIES[family]
        lines.append(f"# The chat template ({family}) in Ollama's template language.")
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def ollama_commands(name: str, folder: Path, modelfile_name: str = "Modelfile") -> list[str]:
    return [f"cd {folder}", f"ollama create {name} -f {modelfile_name}", f"ollama run {name}"]
