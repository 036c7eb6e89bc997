"""The pipeline's steps, one module each; `lab.steps.registry` lists them in order.

Kept empty so that importing one step (or a module a step uses) never imports them all.
"""
