"""Training: cached tower features, the teacher and the distilled students; shared by every trainer
(fine tiers and hash heads included): the loop (``loop.fit``), the losses (``losses``), best-on-val
selection (``selection``) and the shipped recipes as files (``recipes/``)."""
