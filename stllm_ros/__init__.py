"""stllm_ros: thin ROS 2 adapters around stllm_core (nodes, message conversions, runner, bag player).

The generated interfaces (stllm_ros.srv, stllm_ros.msg) live in the colcon install tree; extend the package path so that
running from the source tree still finds them.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
