"""Packaging for rave-basicsr: the BasicSR plugin for CLIP-guided backlit image enhancement."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'rave_basicsr' / 'version.py').read_text()).group(1)

setup(
    name='rave-basicsr',
    version=VERSION,
    description='BasicSR plugin for CLIP-guided backlit image enhancement: RAVE, CLIP-LIT and CLIP-LIT-Latent',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['rave_basicsr', 'rave_basicsr.*']),
    package_data={'rave_basicsr': ['configs/*.json', 'data/*.txt']},
    install_requires=[
        'basicsr==1.4.2',
        'torch>=2.1',
        'torchvision',
        'open_clip_torch>=2.24',
        'opencv-python',
        'lmdb',
        'pyyaml',
        'scipy<2',
        'safetensors',
        'tqdm',
    ],
    extras_require={'test': ['pytest>=7', 'pytest-timeout', 'pytest-xdist>=3.8']},
    entry_points={
        'console_scripts': [
            'basicsr=rave_basicsr.cli.basicsr_cli:main',
            'rave=rave_basicsr.cli.rave_cli:main',
        ],
        'basicsr.plugins': ['rave_basicsr=rave_basicsr'],
    },
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Image Processing'],
)
