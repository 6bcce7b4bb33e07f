"""Text generation: options, sampler, KV memory, the token loop, conversations, model.

From the request to the sampled id: :mod:`options` (what the caller asks, resolved once)
-> :mod:`model` (the shared :class:`TextGenerator`) -> :mod:`conversation` (one caller's
KV state and prefix reuse) -> :mod:`loop` (the token loop) -> :mod:`backends` (KV per
graph layout: :mod:`kv_slots`, :mod:`kv_pool`, :mod:`step_scheduler`) ->
:mod:`plain_step` / :mod:`fused_step` (one graph run) -> :mod:`sampling`; then
:mod:`chunks` (text) and :mod:`results`. Also :mod:`batch` (several prompts at once),
:mod:`scoring` (choice among options), :mod:`prefix_cache` (files), :mod:`perplexity`.
"""
