"""`python -m retro.demo`: the whole pipeline on a laptop CPU, and a miniature test of the paper's claim.

A synthetic task where depth helps (retro.demo.task), a small static Llama pretrained on it
(retro.demo.pretrain), retrofitted with retro.convert and post-trained with retro.train (2 ranks,
Muon, 1-sqrt curriculum), against the static model trained for the same FLOPs; accuracy by number
of steps and test recurrence (retro.demo.evaluate, retro.demo.report). Stages: retro.demo.pipeline.
"""
