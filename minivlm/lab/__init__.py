"""Experiments on trained models: probe (what a shapes model looks at and knows), grow (a deeper
decoder that computes what the trained one did). Nothing in training or inference imports this.
"""
