//! The masked CRC-32C (Castagnoli) of TFRecord framing, on the `crc32c` crate
//! (hardware-accelerated where the CPU has it). `crc32fast` computes the IEEE
//! polynomial, which TensorBoard rejects.

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

/// The masked CRC-32C stored in TFRecord framing.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        // RFC 3720 B.4 and the common "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn mask_matches_tensorboard() {
        // tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c(b"abc")
        assert_eq!(crc32c(b"abc"), 0x364B_3FB7);
        assert_eq!(masked_crc32c(b"abc"), 0x21F1_576E);
    }
}
