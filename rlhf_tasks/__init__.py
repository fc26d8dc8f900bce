"""Three-step RLHF (SFT, reward model, PPO) on DeepSpeed.

Importable without Airflow; the DAG in ``dags/`` launches each stage as
``python -m rlhf_tasks <stage>``.
"""

__version__ = "0.1.0"
