"""haboob_build: turns a site into a bootable appliance image.

Theory of operation (mkosi style): `steps.STEPS` is a straight list of named
steps, each a function over one `context.Context`. Steps add files to the
context's in-memory image tree (`tree.Tree`), record inputs and facts for
the manifest, and never write outside the context's temporary work folder;
the last step renames the finished folder into place, so a failed build
leaves nothing half-written. Every subprocess goes through `context.run`.
Slow, input-determined work (the kernel package, the Python runtime) is
cached under the user's cache folder, keyed by what determines it.
"""
