from setuptools import find_packages, setup


def requirements(path):
    with open(path) as f:
        return [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]


setup(
    name='mllm',
    version='0.1.0',
    description='Config-driven training of multimodal LLMs (LLaVA-1.5, LLaVA-Med, ConvLLaVA, '
                'MG-LLaVA, LLaVA-UHD) on XTuner and MMEngine',
    packages=find_packages(include=['mllm', 'mllm.*']),
    python_requires='>=3.10,<3.13',
    # xtuner itself is installed with --no-deps (requirements-nodeps.txt explains why)
    install_requires=requirements('requirements.txt'),
    entry_points={'console_scripts': ['mllm = mllm.cli:main'],
                  # `python -m lmms_eval --model mllm` (lmms-eval >= 0.6; optional dependency)
                  'lmms_eval.models': ['mllm = mllm.evaluation.lmms_eval_adapter:manifest']},
)
