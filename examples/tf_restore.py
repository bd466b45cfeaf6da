"""TensorFlow restores our EMA: the article's graph, built with tf.compat.v1, restored from a
checkpoint that `train_linear --format tf` wrote, once with a plain Saver() and once with
Saver(ema.variables_to_restore()), printed as the article prints them, and compared bit for
bit with the same run's safetensors checkpoint (read here without the safetensors package).

    python examples/tf_restore.py TF_DIR SAFETENSORS_FILE
"""
import json
import struct
import sys

import numpy as np
import tensorflow as tf

tf.compat.v1.disable_eager_execution()
tf_dir, st_path = sys.argv[1], sys.argv[2]


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(info["shape"])
    return out


ours = read_safetensors(st_path)
prefix = tf.train.latest_checkpoint(tf_dir)
assert prefix is not None, f"tf.train.latest_checkpoint({tf_dir!r}) found nothing"

with tf.Graph().as_default():
    weight = tf.compat.v1.get_variable("weight", [2, 1])
    bias = tf.compat.v1.get_variable("bias", [])
    global_step = tf.compat.v1.train.get_or_create_global_step()
    x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    y = tf.compat.v1.placeholder(tf.float32, [None, 1])
    loss = tf.reduce_mean(tf.square(tf.matmul(x, weight) + bias - y))
    train = tf.compat.v1.train.MomentumOptimizer(0.05, 0.9).minimize(loss, global_step=global_step)
    ema = tf.compat.v1.train.ExponentialMovingAverage(0.9999, num_updates=global_step)
    with tf.control_dependencies([train]):
        ema.apply([weight, bias])
    with tf.compat.v1.Session() as s:
        tf.compat.v1.train.Saver().restore(s, prefix)
        print(f"restored {prefix} (global_step = {s.run(global_step)})")
        print("variables restored not from ExponentialMovingAverage:")
        for v in (weight, bias):
            got = s.run(v)
            print(f"  {v.op.name:<8} {got.reshape(-1).tolist()}")
            assert got.tobytes() == ours[v.op.name].tobytes(), v.op.name
        for v in tf.compat.v1.global_variables():
            if v.op.name in ours:
                assert s.run(v).tobytes() == ours[v.op.name].tobytes(), v.op.name
        tf.compat.v1.train.Saver(ema.variables_to_restore()).restore(s, prefix)
        print("variables restored from ExponentialMovingAverage:")
        for v in (weight, bias):
            got = s.run(v)
            print(f"  {v.op.name:<8} {got.reshape(-1).tolist()}")
            want = ours[v.op.name + "/ExponentialMovingAverage"]
            assert got.tobytes() == want.tobytes(), (v.op.name, got, want)
print("TensorFlow restored our checkpoint; raw and EMA values equal ours bit for bit")
