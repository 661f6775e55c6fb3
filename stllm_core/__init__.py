"""stllm_core: all of stllm's logic (model, engine, memory, data). Never imports rclpy."""

__version__ = "0.2.0"
