"""LoRA training dashboard: all logic, importable without Streamlit.

Run `python -m trainer --help` for the command line (preview, train, perplexity).
"""
