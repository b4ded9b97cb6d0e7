"""Receipts are signed by a key derived from the server's identity."""

from __future__ import annotations


def test_receipts_are_signed_by_a_key_derived_from_the_identity(tmp_path):
    from dht.identity import ensure_identity, make_validator, receipt_signer
    from protocol.receipts import Receipt, public_key_hex, sign, verify

    validator = make_validator(ensure_identity(tmp_path / "id.key"))
    key = receipt_signer(validator)
    assert public_key_hex(receipt_signer(make_validator(tmp_path / "id.key"))) == public_key_hex(key)  # stable
    other = public_key_hex(receipt_signer(make_validator(ensure_identity(tmp_path / "other.key"))))
    receipt = Receipt(4, 2, "a" * 64, "b" * 64, "")
    message = receipt.message("m", 0, 2, "s" * 32, "float32", "c" * 64)
    signature = sign(key, message)
    assert verify(public_key_hex(key), message, signature)
    assert not verify(other, message, signature)
    assert not verify(public_key_hex(key), receipt.message("m", 0, 2, "t" * 32, "float32", "c" * 64), signature)
    assert not verify(public_key_hex(key), receipt.message("m", 0, 2, "s" * 32, "float16", "c" * 64), signature)
    assert not verify(public_key_hex(key), receipt.message("m", 0, 2, "s" * 32, "float32", "d" * 64), signature)
    assert not verify(public_key_hex(key), message, "zz")  # malformed is simply not valid
    assert not verify("00", message, signature)


def test_the_mask_digest_is_the_same_however_the_mask_is_written_and_differs_for_another_mask():
    import torch

    from protocol.receipts import mask_digest

    everything = mask_digest(None, 2, 5)
    assert mask_digest(torch.ones(2, 5, dtype=torch.int64), 2, 5) == everything
    assert mask_digest(torch.ones(2, 5, dtype=torch.bool), 2, 5) == everything
    padded = torch.ones(2, 5, dtype=torch.int64)
    padded[0, 0] = 0
    assert mask_digest(padded, 2, 5) != everything
    assert mask_digest(padded.bool(), 2, 5) == mask_digest(padded, 2, 5)
    assert mask_digest(torch.ones(1, 10), 1, 10) != mask_digest(torch.ones(2, 5), 2, 5)  # the shape counts
