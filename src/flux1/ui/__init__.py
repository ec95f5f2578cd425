"""flux1-ui: a local web page over `Flux1` (the optional extra `pip install flux1[ui]`, on Gradio).
flux1 itself never imports this package, so it runs without Gradio."""
