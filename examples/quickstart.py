"""Train a stock Flax MLP with 2:8 sparsity (MDGF, then a hard-mask fine-tune) on synthetic data.

The README's quickstart, verbatim (tests run it from the README and from a fresh venv).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import nmsparse

model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(1)])
x = jax.random.normal(jax.random.key(0), (256, 32))
y = jnp.sin(x.sum(-1, keepdims=True))
params = model.init(jax.random.key(1), x)['params']
rules = [(r'layers_[02]/kernel', nmsparse.NMSpec(2, 8))]  # 2 of every 8 inputs, first two layers.
config = nmsparse.recipe_config('mdgf', finetune_frac=0.2, **{'decay.final': 0.01})  # a(t): 1 -> 0.01
sp = nmsparse.make_sparsifier(config, rules, params, total_steps=100)
tx = optax.chain(sp.scale_by_adam(), optax.add_decayed_weights(1e-4), optax.scale(-3e-3))  # AdamW
opt_state, sparsity = tx.init(params), sp.init(params)


@jax.jit
def train_step(params, opt_state, sparsity, step):
  sparsity = sp.update(params, sparsity, step)
  loss_fn = lambda p: jnp.mean((model.apply({'params': sp.apply(p, sparsity, step, opt_state)}, x) - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, sparsity, loss


for step in range(100):
  params, opt_state, sparsity, loss = train_step(params, opt_state, sparsity, step)
  if step % 25 == 0 or step == 99:
    print(f'step {step:3d}  loss {loss:.4f}')
kernels = sp.apply(params, sparsity, 100, opt_state)  # Step == total: the final hard N:M model.
zeros = [jnp.mean(kernels[k]['kernel'] == 0) for k in ('layers_0', 'layers_2')]
print('achieved sparsity of the sparsified kernels:', [f'{float(z):.1%}' for z in zeros])
