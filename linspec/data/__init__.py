"""Text in: documents and their packing into sequences (``documents``), the built-in corpora (``corpus``), chat data
(``chat``), recall data placed past the window (``recall``) and held-out instruction prompts (``prompts``). Shared by
training, drafter data and evaluation.
"""
