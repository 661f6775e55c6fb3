"""ros2 launch stllm_ros reasoning.launch.py [model:=...] [image_topic:=...] [params_file:=...] [bag:=...]
                                            [namespace:=robot1]

The node runs in the robot's namespace: `namespace:=robot1`, or a PushRosNamespace of an including launch file; its
default names are relative (stllm/ask, camera/color/image_raw, ...), and the parameters file is keyed `/**:`.

The same nodes and parameters as `stllm-run` (stllm_ros/stack.py is the one description of both). Launch arguments left
empty keep the value from the parameters file (config/reasoner.yaml)."""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch_ros.actions import LifecycleNode, Node

from stllm_ros.stack import LAUNCH_ARGUMENTS, NODES, REPLAY_PARAMS, default_params_file, player_arguments


def _nodes(context):
    get = context.perform_substitution
    from launch.substitutions import LaunchConfiguration

    bag = get(LaunchConfiguration("bag"))
    # with a bag: the replay parameters of stllm-run (sim time, reliable deep sensor QoS); arguments given still win
    overrides = dict(REPLAY_PARAMS) if bag else {}
    if bag or get(LaunchConfiguration("use_sim_time")).lower() in ("1", "true", "yes"):
        overrides["use_sim_time"] = True
    for arg, (param, _help) in LAUNCH_ARGUMENTS.items():
        value = get(LaunchConfiguration(arg))
        if value != "":
            overrides[param] = value
    actions = [
        LifecycleNode(
            package="stllm_ros",
            executable=spec.executable,
            name=spec.name,
            namespace=get(LaunchConfiguration("namespace")) or None,  # None: the pushed namespace, if any
            parameters=[get(LaunchConfiguration("params_file")), overrides],
            output="screen",
        )
        for spec in NODES
    ]
    if bag:
        # the same replay as stllm-run --bag: /clock, started once the reasoner subscribes (after its model loaded)
        actions.append(Node(package="stllm_ros", executable="stllm-play", arguments=player_arguments(bag),
                            output="screen"))
    return actions


def generate_launch_description():
    args = [
        DeclareLaunchArgument("params_file", default_value=str(default_params_file()), description="parameters YAML"),
        DeclareLaunchArgument("namespace", default_value="", description="the robot's namespace (e.g. robot1)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (true when bag is set)"),
        DeclareLaunchArgument(
            "bag", default_value="", description="a rosbag2 bag to replay with stllm-play (optional)"
        ),
    ]
    for arg, (_param, help_text) in LAUNCH_ARGUMENTS.items():
        args.append(DeclareLaunchArgument(arg, default_value="", description=f"{help_text} (empty = params file)"))
    return LaunchDescription([*args, OpaqueFunction(function=_nodes)])
