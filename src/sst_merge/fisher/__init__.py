"""Fisher information of the safety and utility objectives, and the generalized eigenproblem (design §5).

**Definitions** (recorded in every ``sst`` result's diagnostics):

* ``F_s = E[g gᵀ]`` over safety items, ``g = ∇_W log p(refusal | harmful prompt)``;
* ``F_u = E[g gᵀ]`` over utility items, ``g = ∇_W log p(y | x)`` with ``y`` the dataset's response (*empirical*) or
  sampled from the pre-merge model at temperature 1 with a seeded ``torch.Generator`` (*true*, the default);
* ``log p(y | x)`` sums the log-probabilities of the response tokens only (prompt and padding contribute no term);
  the prompt is rendered with the tokenizer's chat template and the generation prompt, and the response tokens are
  what the template adds after it (so the end-of-turn token is included);
* gradients are taken in eval mode (no dropout), with respect to the full weight ``W`` (out×in) of every module the
  safety adapter changes — the ΔW space the projection acts on — at the pre-merge point (base + weighted utility
  ΔW), over a fixed number N of seeded examples.

**Layout** — pure math first, model code apart:

* :mod:`.gevp` — selection rules, the dense reference solver (``scipy.linalg.eigh(a, b)``), the oblique projector;
* :mod:`.approximation` — the registry of approximations; one file each: :mod:`.dense`, :mod:`.diagonal`,
  :mod:`.kfac`, :mod:`.lowrank` (what is stored, how it accumulates, how it projects); :mod:`.solve` — the
  per-module entry point;
* :mod:`.objective` — objectives as data (which prompts, which responses, which tokens carry the loss);
* :mod:`.pipeline` — one call from objectives to cached statistics (keys, model, responses, DDP);
* :mod:`.data` — items, chat-template tokenisation, response masks, batches;
* :mod:`.grads` — per-example gradients from one batched backward (hooks + ``einsum``);
* :mod:`.sampling` — seeded sampling (true Fisher) and greedy answers;
* :mod:`.estimate` — statistics of a registered approximation; :mod:`.cache` — the on-disk cache;
* :mod:`.diagnostics` — λ spectrum JSON + PNG.
"""
