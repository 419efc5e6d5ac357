"""Encoders: text, image and audio models behind one interface (`base.Encoder`), registered by name in
`mmrank.registry.ENCODERS` and built once per Python process by `registry.get_encoder(modality, features)`."""
