.PHONY: setup setup-serving demo test clean
setup:      ## set up everything (venv, ROS 2, deps, colcon build); idempotent
	bash scripts/setup.sh
setup-serving: ## the vLLM venv for stllm-serve (a fleet's language-model server); idempotent
	bash scripts/setup_serving.sh
demo: setup ## the main job: start the stack, replay the demo bag, ask questions of every type
	bash scripts/demo.sh
test:       ## lint + test suite (what CI runs)
	bash scripts/test.sh
clean:
	rm -rf build install log
