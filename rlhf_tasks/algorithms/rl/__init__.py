"""The RL algorithms' one loop (loop.py) and what it stands on: generation (generation.py,
static_decode.py), the models it holds (models.py), the reward (rewards.py), from a
rollout to an experience (rollout.py, experience.py), the update (update.py), PPO's
extras (ppo.py)."""
