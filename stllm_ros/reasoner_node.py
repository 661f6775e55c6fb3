"""The reasoning service: /stllm/reasoner, a lifecycle node serving stllm_ros/srv/AskSTLLM.

configure: reads parameters, loads the model (a failure leaves the node unconfigured and says why), starts perception
(image, camera_info, depth, points, /tf, /tf_static -> frame buffer and scene map, hosted in this process so clips are
taken without copies over DDS). activate: questions are answered. `autostart` (default true) configures and activates at
start, as nav2's lifecycle manager does. The service exists in every state; outside `active` it answers
`success: false` with the reason. autostart runs once the executor spins, so the lifecycle and parameter services
answer while the model loads (`ros2 lifecycle get /stllm/reasoner` says "configuring").

Parameters are read when the node is configured. While it is configured, `ros2 param set` of one of them is refused
with the reason (rather than accepted and ignored): cleanup, set, configure. Cleanup also stops perception, so changed
`perception.*` parameters (topics, frames, QoS) apply at the next configure.
"""

from __future__ import annotations

import math
import sys
import threading

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_msgs.msg import String

from stllm_core.errors import InputError
from stllm_core.reasoning.config import HELP, ReasonerConfig
from stllm_core.reasoning.reasoner import Reasoner, Result
from stllm_ros.msg import Answer
from stllm_ros.params import declare_config, guard_config, read_config
from stllm_ros.perception import Perception, PerceptionConfig
from stllm_ros.srv import AskSTLLM


def to_time(seconds: float) -> Time:
    if not math.isfinite(seconds) or seconds <= 0:
        return Time()
    sec = int(seconds)
    return Time(sec=sec, nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


class ReasonerNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("reasoner", namespace="stllm", **kwargs)
        declare_config(self, ReasonerConfig, help=HELP)
        declare_config(self, PerceptionConfig, prefix="perception.")
        self.declare_parameter("autostart", True)
        guard_config(self, ReasonerConfig)
        guard_config(self, PerceptionConfig, prefix="perception.")
        self.add_on_set_parameters_callback(self._refuse_while_configured)
        self.config = read_config(self, ReasonerConfig)
        self.reasoner: Reasoner | None = None
        self.perception: Perception | None = None
        self._not_ready = "the reasoner is not configured yet (no model is loaded)"
        self._active = False
        self.service = self.create_service(
            AskSTLLM, self.config.service_name, self._on_ask, callback_group=ReentrantCallbackGroup()
        )
        self.answers = self.create_publisher(Answer, self.config.answers_topic, 10)
        self.partial = self.create_publisher(String, self.config.partial_topic, 10)

    def _refuse_while_configured(self, params: list) -> SetParametersResult:
        changed = [p.name for p in params if p.name not in ("use_sim_time", "autostart")]
        if self.reasoner is None or not changed:
            return SetParametersResult(successful=True)
        return SetParametersResult(successful=False, reason=(
            f"{', '.join(changed)}: read when the node is configured; cleanup it "
            f"(ros2 lifecycle set {self.get_fully_qualified_name()} cleanup), set the parameter, then configure"))

    # lifecycle ----------------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from stllm_core.reasoning.pipeline import AnswerPipeline

        try:
            self.config = read_config(self, ReasonerConfig)
            pcfg = read_config(self, PerceptionConfig, prefix="perception.")
            self.get_logger().info(f"loading model {self.config.model!r} ({self.config.backend}, {self.config.device})")
            pipeline = AnswerPipeline.load(
                model=self.config.model,
                device=self.config.device,
                dtype=self.config.dtype,
                backend=self.config.backend,
                seed=self.config.seed,
                max_new_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
            )
            if self.config.backend != "eager":  # compile/build engines now, not on the first question
                self.get_logger().info(f"warming up the {self.config.backend} backend (compiling; may take minutes)")
                pipeline.warmup()
        except Exception as e:  # a wrong path/file must leave the node up and say why
            self._not_ready = f"the model failed to load: {e}"
            self.get_logger().error(self._not_ready)
            return TransitionCallbackReturn.FAILURE
        if self.perception is None:
            self.perception = Perception(self, pcfg)
        self.reasoner = Reasoner(self.config, pipeline, self._clip)
        self.get_logger().info(
            f"model {self.config.model!r} ready: {self.reasoner.num_frames} frames per question; "
            f"service {self.config.service_name}"
        )
        self._not_ready = "the reasoner is configured but not active (activate it to answer)"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._not_ready = "the reasoner is inactive (activate it to answer)"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        if self.reasoner is not None:
            self.reasoner.close()
            self.reasoner = None
        if self.perception is not None:  # the next configure starts it with the perception.* parameters of then
            self.perception.close()
            self.perception = None
        self._not_ready = "the reasoner is not configured (no model is loaded)"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.on_cleanup(state)
        return TransitionCallbackReturn.SUCCESS

    # service ------------------------------------------------------------------------------------------------------
    def _clip(self, window_sec: float, num_frames: int, strategy: str):
        """Frames of the last `window_sec` s of the node's clock (sim time when replaying a bag with /clock)."""
        assert self.perception is not None
        now_ns = self.get_clock().now().nanoseconds
        now = now_ns * 1e-9 if now_ns > 0 else None  # sim time before the first /clock: the newest frame's stamp
        clip = self.perception.clip(window_sec, num_frames, strategy, now=now)
        if not clip.frames:
            latest = self.perception.latest_frame()
            if latest is not None and now is not None and now - latest.stamp > window_sec:
                raise InputError(
                    f"the newest camera frame is {now - latest.stamp:.1f} s old, older than the {window_sec:g} s "
                    f"window: is the camera still publishing on {self.perception.config.image_topic}?"
                )
        return clip

    def _on_ask(self, request: AskSTLLM.Request, response: AskSTLLM.Response) -> AskSTLLM.Response:
        reasoner = self.reasoner
        if not self._active or reasoner is None:
            result = Result(False, error=self._not_ready)
        else:
            on_text = None
            if self.config.stream_partial:

                def on_text(text: str) -> None:
                    self.partial.publish(String(data=text))

            result = reasoner.ask(request.question, float(request.window_sec), int(request.max_new_tokens), on_text)
        for name in ("success", "answer", "error", "num_frames", "num_points", "num_tokens"):
            setattr(response, name, getattr(result, name))
        for name in ("encode_ms", "prefill_ms", "decode_ms"):
            setattr(response, name, float(getattr(result, name)))
        response.clip_start = to_time(result.clip_start)
        response.clip_end = to_time(result.clip_end)
        if result.success:
            msg = Answer(stamp=self.get_clock().now().to_msg(), question=request.question, answer=result.answer)
            for name in (
                "clip_start",
                "clip_end",
                "num_frames",
                "num_points",
                "encode_ms",
                "prefill_ms",
                "decode_ms",
                "num_tokens",
            ):
                setattr(msg, name, getattr(response, name))
            self.answers.publish(msg)
            self.get_logger().info(f"Q: {request.question!r} -> A: {result.answer!r} ({result.num_tokens} tokens)")
        else:
            self.get_logger().warning(f"refused {request.question[:80]!r}: {result.error}")
        return response


def main(args=None) -> int:
    rclpy.init(args=args)
    node = ReasonerNode()
    executor = MultiThreadedExecutor(num_threads=node.config.queue_size + 4)
    executor.add_node(node)
    def autostart() -> None:  # in its own thread: the executor serves lifecycle/parameter requests meanwhile
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        node.get_logger().info("stllm reasoner up")  # configured and active, or unconfigured saying why

    try:
        if node.get_parameter("autostart").value:
            threading.Thread(target=autostart, name="stllm-autostart", daemon=True).start()
        else:
            node.get_logger().info("stllm reasoner up")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node.reasoner is not None:
            node.reasoner.close()
        if node.perception is not None:
            node.perception.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
