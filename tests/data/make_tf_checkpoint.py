"""Writes tests/data/tf_ckpt/: a TensorFlow 2.21 checkpoint of the article's graph (weight
[2, 1], bias, momentum SGD, global_step, ExponentialMovingAverage(0.9999, num_updates=
global_step)) after 7 steps on seeded data, and expected.txt with every saved value's float32
bits, for the Rust tests that read it without TensorFlow.

    pip install tensorflow-cpu==2.21.0 && python tests/data/make_tf_checkpoint.py
"""
import os
import numpy as np
import tensorflow as tf

tf.compat.v1.disable_eager_execution()
here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_ckpt")
os.makedirs(here, exist_ok=True)

rng = np.random.default_rng(2017)
x_all = rng.normal(size=(7, 8, 2)).astype(np.float32)
y_all = (x_all @ np.array([[2.0], [-3.4]], np.float32) + 4.2).astype(np.float32)

g = tf.Graph()
with g.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 2])
    y = tf.compat.v1.placeholder(tf.float32, [None, 1])
    weight = tf.compat.v1.get_variable("weight", [2, 1], initializer=tf.compat.v1.constant_initializer([[0.5], [-0.25]]))
    bias = tf.compat.v1.get_variable("bias", [], initializer=tf.compat.v1.constant_initializer(0.1))
    global_step = tf.compat.v1.train.get_or_create_global_step()
    loss = tf.reduce_mean(tf.square(tf.matmul(x, weight) + bias - y))
    opt = tf.compat.v1.train.MomentumOptimizer(0.05, 0.9)
    train = opt.minimize(loss, global_step=global_step)
    ema = tf.compat.v1.train.ExponentialMovingAverage(0.9999, num_updates=global_step)
    with tf.control_dependencies([train]):
        step = ema.apply([weight, bias])
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as s:
        s.run(tf.compat.v1.global_variables_initializer())
        for i in range(7):
            s.run(step, {x: x_all[i], y: y_all[i]})
        os.chdir(here)  # relative paths in the `checkpoint` state file
        prefix = saver.save(s, "ckpt", global_step=global_step, write_meta_graph=False)
        reader = tf.train.load_checkpoint(prefix)
        with open("expected.txt", "w") as f:
            for name in sorted(reader.get_variable_to_shape_map()):
                v = np.asarray(reader.get_tensor(name))
                if v.dtype == np.float32:
                    bits = " ".join(f"{b:08x}" for b in v.reshape(-1).view(np.uint32))
                    f.write(f"{name} {list(v.shape)} {bits}\n")
                else:
                    f.write(f"{name} {list(v.shape)} int {int(v)}\n")
print("wrote", prefix)

# A TF2 object-based checkpoint split into two data shards (MaxShardSizePolicy), with the
# int64 step under its object path and the object graph as a string tensor: tf_sharded/.
os.chdir(os.path.join(os.path.dirname(here), ""))
tf.compat.v1.enable_eager_execution()
sharded = os.path.join(os.path.dirname(here), "tf_sharded")
v = {f"w{i}": tf.Variable(np.arange(i * 1000, i * 1000 + 300, dtype=np.float32).reshape(30, 10)) for i in range(4)}
ckpt = tf.train.Checkpoint(step=tf.Variable(np.int64(42)), **v)
policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=2500)
ckpt.write(os.path.join(sharded, "ckpt"), options=tf.train.CheckpointOptions(experimental_sharding_callback=policy))
print("wrote", sharded)
