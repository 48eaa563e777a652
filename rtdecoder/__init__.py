"""rtdecoder: real-time fMRI closed-loop decoding.

The data's path is volume -> preprocess -> GLM -> decode -> publish: :mod:`rtdecoder.ingest`
watches and reads scanner exports, :mod:`rtdecoder.preprocess` motion-corrects and masks,
:mod:`rtdecoder.glm` updates single-trial betas incrementally, :mod:`rtdecoder.decode` turns betas
into embeddings, retrievals and images, and :mod:`rtdecoder.publish` sends them over ZeroMQ.
:mod:`rtdecoder.phantom` simulates subjects and a scanner so that all of it runs without one.
"""

__version__ = "0.1.0"
