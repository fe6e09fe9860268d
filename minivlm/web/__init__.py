"""The local web page (`python -m minivlm.web`): server (standard-library HTTP), watch (decoding that
records probabilities and attention), static/index.html.
"""
