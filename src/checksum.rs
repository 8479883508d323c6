//! CRC32C (Castagnoli), the checksum of cache entries and key-set records.
//!
//! Computed with `crc-fast`, which folds 64 bytes at a time with carry-less multiplies (VPCLMULQDQ
//! where the CPU has it) instead of one `crc32` instruction per 8 bytes: measured on this project's
//! machines, a 55 KB body in 0.66 µs against 2.5 µs, and no slower on a 12-byte record. It is the same
//! function, so entries written by earlier releases verify as before (see the test).

use crc_fast::{CrcAlgorithm, Digest};

/// The CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// The CRC32C of the bytes that gave `crc`, followed by `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The running state is the finished CRC before its final inversion.
    let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    proptest! {
        /// The same function as the `crc32c` crate that wrote the entries of earlier releases, whole or
        /// appended at any split.
        #[test]
        fn same_as_the_earlier_implementation(data in proptest::collection::vec(any::<u8>(), 0..5000), split in any::<prop::sample::Index>()) {
            let split = split.index(data.len() + 1);
            prop_assert_eq!(crc32c(&data), ::crc32c::crc32c(&data));
            let head = crc32c(&data[..split]);
            prop_assert_eq!(crc32c_append(head, &data[split..]), ::crc32c::crc32c(&data));
        }
    }
}
