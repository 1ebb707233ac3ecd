"""Fused Triton kernels for DCGAN layers: each layer is one implicit GEMM (conv or conv-transpose,
kernel 4) that applies the previous layer's BatchNorm and activation as it loads its input and
adds bias, tanh or this layer's BN statistics as it stores its output.

Installed as fastgan.kernels (setup.py maps this folder there): a top-level `kernels` module
would collide with an unrelated PyPI package of that name. Import it as `fastgan.kernels.*`.

Reading order
  fusion.py          the vocabulary: prologue kinds (PRO_*) and activations (ACT_*) as Triton
                     constexpr globals; Prologue / Epilogue, what a launcher is told to fuse
  operands.py        @triton.jit helpers every GEMM shares: load_operand (the prologues),
                     epilogue (bias, tanh, BN statistics; or, in backward, the activation
                     derivative and BN-backward sums), rounding to the GEMM dtype
  conv.py            _conv_kernel and its launcher conv2d
  conv_transpose.py  _conv_transpose_kernel and its launcher conv_transpose2d
  wgrad.py           _wgrad_kernel (weight gradients, split-K) and _channel_sum_kernel (bias
                     gradients), launchers wgrad and channel_sum
  batchnorm.py       _bn_stats_kernel and _bn_grad_kernel: the per-channel step between GEMMs
  layer.py           the torch.library ops fastgan::conv_layer and fastgan::conv_layer_backward
                     and their autograd registration: where the pieces above meet
  utils.py           shared helpers: interpreter mode, block sizes, weight packing, op registration

Forward, one call per layer (fastgan.models.run_blocks -> fastgan/fused.py forward):
  torch.ops.fastgan.conv_layer                               layer.conv_layer
    D (conv):            conv.conv2d                         -> _conv_kernel
    G (conv-transpose):  conv_transpose.conv_transpose2d     -> _conv_transpose_kernel
      (both: operands.load_operand applies the previous BN + activation, operands.epilogue
       stores y and the per-tile BN sums)
    with BN statistics:  batchnorm.bn_stats                  -> _bn_stats_kernel

Backward (autograd -> layer._backward):
  torch.ops.fastgan.conv_layer_backward                      layer.conv_layer_backward
    dx, D layer:         conv_transpose.conv_transpose2d     -> _conv_transpose_kernel
    dx, G layer:         conv.conv2d                         -> _conv_kernel
      (dgrad epilogue: activation derivative, BN-backward sums; dL/dy formed on load)
    previous BN's grads: batchnorm.bn_grad                   -> _bn_grad_kernel
    dW:                  wgrad.wgrad                         -> _wgrad_kernel
    dbias:               wgrad.channel_sum                   -> _channel_sum_kernel
"""
