"""The reasoning service: stllm_reasoner (in the robot's namespace, default the root), a lifecycle node serving
stllm_ros/srv/AskSTLLM and the action
stllm_ros/action/AskSTLLM (feedback: phase and the answer so far; cancel stops decoding at the next token; goals beyond
the queue bound are rejected at goal time, the reason logged and counted in the diagnostics). Both go to one worker.
Partial answers go to the partial topic as stllm_ros/msg/PartialAnswer with the request's id; diagnostics to
/diagnostics (diagnostic_msgs/DiagnosticArray, every diagnostics_period_sec).

configure: reads parameters, loads the model (a failure leaves the node unconfigured and says why), starts perception
(image, camera_info, depth, points, /tf, /tf_static -> frame buffer and scene map, hosted in this process so clips are
taken without copies over DDS). activate: questions are answered. `autostart` (default true) configures and activates at
start, as nav2's lifecycle manager does. The service exists in every state; outside `active` it answers
`success: false` with the reason. autostart runs once the executor spins, so the lifecycle and parameter services
answer while the model loads (`ros2 lifecycle get /stllm_reasoner` says "configuring").

Parameters are read when the node is configured. While it is configured, `ros2 param set` of one of them is refused
with the reason (rather than accepted and ignored): cleanup, set, configure. Cleanup also stops perception, so changed
`perception.*` parameters (topics, frames, QoS) apply at the next configure.
"""

from __future__ import annotations

import math
import sys
import threading
import uuid

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from stllm_core.errors import InputError
from stllm_core.reasoning.config import HELP, ReasonerConfig
from stllm_core.reasoning.reasoner import Reasoner, Request, Result
from stllm_ros.action import AskSTLLM as AskSTLLMAction
from stllm_ros.msg import Answer, PartialAnswer
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
        super().__init__("stllm_reasoner", **kwargs)
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
        group = ReentrantCallbackGroup()
        self.service = self.create_service(AskSTLLM, self.config.service_name, self._on_ask, callback_group=group)
        self._goals: dict[bytes, Request] = {}  # goal id -> its request, for cancel
        self._goals_lock = threading.Lock()
        self._rejected = 0  # goals refused at goal time (busy or not ready)
        self.action = ActionServer(
            self, AskSTLLMAction, self.config.action_name, execute_callback=self._on_goal_execute,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel, callback_group=group,
        )
        self.answers = self.create_publisher(Answer, self.config.answers_topic, 10)
        self.partial = self.create_publisher(PartialAnswer, self.config.partial_topic, 10)
        self.diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if self.config.diagnostics_period_sec > 0:
            # a steady clock: with use_sim_time the ROS clock stops when /clock does, and diagnostics must not
            self.create_timer(self.config.diagnostics_period_sec, self.publish_diagnostics, callback_group=group,
                              clock=Clock(clock_type=ClockType.STEADY_TIME))

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
                llm_url=self.config.llm_url,
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
        perception = self.perception
        assert perception is not None
        now_ns = self.get_clock().now().nanoseconds
        now = now_ns * 1e-9 if now_ns > 0 else None  # sim time before the first /clock: the newest frame's stamp
        latest = perception.latest_frame()
        if latest is not None and now is not None and latest.stamp > now:
            # a frame stamped after this node's "now" has been received: the camera's clock is ahead (another
            # computer without time sync) or /clock has not caught up with the bag yet; it is the latest observation
            if latest.stamp - now > 1.0:
                self.get_logger().warning(
                    f"camera frames are stamped {latest.stamp - now:.1f} s ahead of this node's clock: check the "
                    "time sync between the camera's computer and this one (chrony), or use_sim_time with /clock",
                    throttle_duration_sec=30.0)
            now = latest.stamp
        clip = perception.clip(window_sec, num_frames, strategy, now=now)
        if not clip.frames:
            latest = perception.latest_frame()  # again: a reset (bag loop) may have emptied the buffer meanwhile
        if not clip.frames and latest is None:
            reset = perception.last_reset()
            since = f" since perception was reset {reset[0]:.1f} s ago ({reset[1]})" if reset else ""
            raise InputError(
                f"no camera frames with a known pose yet{since}: check that images arrive on "
                f"{perception.config.image_topic} and that TF connects the camera frame to "
                f"{perception.config.world_frame}"
            )
        if not clip.frames and now is not None and now - latest.stamp > window_sec:
            raise InputError(
                f"the newest camera frame is {now - latest.stamp:.1f} s old, older than the {window_sec:g} s "
                f"window: is the camera still publishing on {perception.config.image_topic}?"
            )
        return clip

    def _partial_cb(self, request_id: str, extra=None):
        """on_text for one request: PartialAnswer on the partial topic (when stream_partial), then `extra`."""
        stream = self.config.stream_partial

        def on_text(text: str, num_tokens: int) -> None:
            if stream:
                self.partial.publish(PartialAnswer(stamp=self.get_clock().now().to_msg(), request_id=request_id,
                                                   text=text, num_tokens=num_tokens))
            if extra is not None:
                extra(text, num_tokens)

        return on_text

    def _fill(self, out, result: Result):
        """Copy a Result into a service response or an action result."""
        for name in ("success", "answer", "error", "request_id", "num_frames", "num_points", "num_tokens"):
            setattr(out, name, getattr(result, name))
        for name in ("encode_ms", "prefill_ms", "decode_ms"):
            setattr(out, name, float(getattr(result, name)))
        out.clip_start = to_time(result.clip_start)
        out.clip_end = to_time(result.clip_end)
        return out

    def _finished(self, question: str, result: Result, out) -> None:
        """Log the outcome; publish an Answer for an answered question."""
        if result.success:
            msg = Answer(stamp=self.get_clock().now().to_msg(), question=question, answer=result.answer)
            for name in ("clip_start", "clip_end", "num_frames", "num_points", "encode_ms", "prefill_ms", "decode_ms",
                         "num_tokens"):
                setattr(msg, name, getattr(out, name))
            self.answers.publish(msg)
            self.get_logger().info(f"Q: {question!r} -> A: {result.answer!r} ({result.num_tokens} tokens)")
        elif result.status == "cancelled":
            self.get_logger().info(f"cancelled {question[:80]!r} after {result.num_tokens} tokens")
        else:
            self.get_logger().warning(f"refused {question[:80]!r}: {result.error}")

    def _on_ask(self, request: AskSTLLM.Request, response: AskSTLLM.Response) -> AskSTLLM.Response:
        reasoner = self.reasoner
        request_id = request.request_id or uuid.uuid4().hex
        if not self._active or reasoner is None:
            result = Result(False, error=self._not_ready, request_id=request_id)
        else:
            result = reasoner.submit(request.question, float(request.window_sec), int(request.max_new_tokens),
                                     self._partial_cb(request_id), request_id=request_id).wait()
        self._fill(response, result)
        self._finished(request.question, result, response)
        return response

    # action -------------------------------------------------------------------------------------------------------
    def _on_goal(self, goal: AskSTLLMAction.Goal) -> GoalResponse:
        """Reject at goal time what cannot be queued (the client sees `accepted: false`; the reason is logged and
        counted). Other refusals (a bad question, no frames) are accepted and end ABORTED with the reason."""
        reasoner = self.reasoner
        reason = self._not_ready if not self._active or reasoner is None else reasoner.reserve()
        if reason is None:
            return GoalResponse.ACCEPT
        self._rejected += 1
        self.get_logger().warning(f"rejected goal {goal.question[:80]!r}: {reason}")
        return GoalResponse.REJECT

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._goals_lock:
            request = self._goals.get(bytes(goal_handle.goal_id.uuid))
        if request is not None:
            request.cancel()
        return CancelResponse.ACCEPT  # a goal not running yet is cancelled when execute starts (below)

    def _on_goal_execute(self, goal_handle) -> AskSTLLMAction.Result:
        goal = goal_handle.request
        goal_id = bytes(goal_handle.goal_id.uuid)
        request_id = goal_id.hex()
        reasoner = self.reasoner
        state = {"phase": "queued", "text": "", "tokens": 0}
        lock = threading.Lock()

        def feedback() -> None:
            goal_handle.publish_feedback(AskSTLLMAction.Feedback(
                phase=state["phase"], partial_answer=state["text"], num_tokens=state["tokens"]))

        def on_phase(phase: str) -> None:
            with lock:
                state["phase"] = phase
                feedback()

        def on_text(text: str, n: int) -> None:
            with lock:
                state.update(phase="generating", text=text, tokens=n)
                feedback()

        if reasoner is None:  # cleaned up between goal acceptance and execution
            result = Result(False, error=self._not_ready, request_id=request_id)
        else:
            temperature = None if goal.temperature < 0 else float(goal.temperature)
            top_p = None if goal.top_p == 0 else float(goal.top_p)
            request = reasoner.submit(goal.question, float(goal.window_sec), int(goal.max_new_tokens),
                                      self._partial_cb(request_id, on_text), on_phase, temperature, top_p,
                                      request_id=request_id, reserved=True)
            with self._goals_lock:
                self._goals[goal_id] = request
            if request.job is not None:
                feedback()  # phase: queued
            if goal_handle.is_cancel_requested:  # cancelled before the request existed
                request.cancel()
            try:
                result = request.wait()
            finally:
                with self._goals_lock:
                    self._goals.pop(goal_id, None)
        out = self._fill(AskSTLLMAction.Result(), result)
        if result.status == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        self._finished(goal.question, result, out)
        return out

    # diagnostics --------------------------------------------------------------------------------------------------
    def diagnostic_status(self) -> DiagnosticStatus:
        """The reasoner's health: ERROR unconfigured (why), WARN inactive or the newest frame older than the window,
        OK otherwise; values: model, backend, device, state, queue, counts, latencies."""
        cfg, reasoner, perception = self.config, self.reasoner, self.perception
        values = {"model": cfg.model, "llm_url": cfg.llm_url or "(local)", "backend": cfg.backend, "device": cfg.device,
                  "state": "active" if self._active else ("inactive" if reasoner is not None else "unconfigured"),
                  "rejected_goals": self._rejected}
        if reasoner is None:
            level, message = DiagnosticStatus.ERROR, self._not_ready
        else:
            stats = reasoner.stats.snapshot()
            values.update(queue_length=reasoner.worker.waiting, answering=reasoner.worker.busy,
                          answers=stats["answered"], refusals=stats["refused"], cancellations=stats["cancelled"],
                          timeouts=stats["timeout"])
            for key in ("last_latency_ms", "p95_latency_ms", "last_encode_ms", "last_prefill_ms", "last_decode_ms"):
                values[key] = f"{stats[key]:.1f}"
            values["last_refusal"] = stats["last_refusal"]
            level, message = DiagnosticStatus.OK, "ready"
            latest = perception.latest_frame() if perception is not None else None
            now_ns = self.get_clock().now().nanoseconds
            if latest is not None and now_ns > 0:
                age = now_ns * 1e-9 - latest.stamp
                values["newest_frame_age_sec"] = f"{age:.2f}"
                if age > cfg.window_sec:
                    level = DiagnosticStatus.WARN
                    message = (f"the newest camera frame is {age:.1f} s old, older than the {cfg.window_sec:g} s "
                               "window")
            elif latest is None:
                level, message = DiagnosticStatus.WARN, "no camera frame with a known pose yet"
            if not self._active:
                level, message = DiagnosticStatus.WARN, self._not_ready
        return DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: reasoner", message=message,
                                hardware_id=cfg.model,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    def publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=[self.diagnostic_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics.publish(msg)


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
