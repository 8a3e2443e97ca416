"""LoRA training dashboard: `make run` serves it at http://localhost:8501."""

import streamlit as st

from views.common import app_pages

st.set_page_config(page_title="LoRA training dashboard", page_icon="🧪", layout="wide")
st.navigation(list(app_pages().values())).run()
