"""stllm-perception: a standalone node hosting Perception (camera + depth/points + TF -> frame buffer and scene map).

The reasoner hosts Perception in its own process (no frame copies over DDS); run this node alone to build and publish
the map (/stllm/map, /diagnostics) without a model, e.g. to inspect it in RViz or to save it with `map_path`.

    stllm-perception --ros-args -p image_topic:=/camera/color/image_raw -p world_frame:=map -p depth_topic:=/depth

Parameters: every field of PerceptionConfig (nested ones dotted: `buffer.max_frames`, `map.voxel_size`).
"""

from __future__ import annotations

import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from stllm_core.errors import STLLMError
from stllm_ros.params import declare_config, guard_config, read_config
from stllm_ros.perception import Perception, PerceptionConfig


class PerceptionNode(Node):
    def __init__(self, **kwargs):
        super().__init__("stllm_perception", **kwargs)
        declare_config(self, PerceptionConfig)
        guard_config(self, PerceptionConfig)  # topic/frame changes apply at the next start; bad values are refused
        self.perception = Perception(self, read_config(self, PerceptionConfig))

    def destroy_node(self) -> None:
        self.perception.close()
        super().destroy_node()


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = PerceptionNode()
    except STLLMError as e:
        print(f"stllm-perception: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    try:
        node.get_logger().info("stllm perception up")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
