"""LoRA training dashboard: `make run` serves it at http://localhost:8501."""

import streamlit as st

st.set_page_config(page_title="LoRA training dashboard", page_icon="🧪", layout="wide")

pages = [
    st.Page("views/data.py", title="Data", icon="📄", url_path="data", default=True),
    st.Page("views/train.py", title="Train", icon="🏋️", url_path="train"),
    st.Page("views/evaluate.py", title="Evaluate", icon="📈", url_path="evaluate"),
]
st.navigation(pages).run()
