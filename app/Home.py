"""Locphylax: the Streamlit front end. `make app` serves it; every page lives in app/views/."""

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import support` from every page

st.set_page_config(page_title="Locphylax", page_icon="🛡️", layout="wide")

PAGES = [
    st.Page("views/live_demo.py", title="Live demo", icon="🎓", default=True, url_path="live_demo"),
    st.Page("views/setup.py", title="Setup", icon="⚙️", url_path="setup"),
    st.Page("views/run.py", title="Run", icon="▶️", url_path="run"),
    st.Page("views/aggregation.py", title="Aggregation", icon="🔵", url_path="aggregation"),
    st.Page("views/heads.py", title="Heads", icon="🧠", url_path="heads"),
    st.Page("views/compare.py", title="Compare", icon="📊", url_path="compare"),
    st.Page("views/casd.py", title="CASD", icon="🧭", url_path="casd"),
    st.Page("views/layers.py", title="Layers", icon="🪜", url_path="layers"),
    st.Page("views/export.py", title="Export", icon="💾", url_path="export"),
]
st.navigation(PAGES).run()
