"""Running the Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU machines)."""


def patch_interpreter_for_numpy2():
    """Triton 3.6's interpreter keeps scalars as 1-element arrays and converts loop bounds with
    int(array), which NumPy >= 2.4 rejects; take the element instead. Call before the first
    interpreted launch."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_numpy2_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._numpy2_patched = True
    interp._patch_lang_tensor = patched
