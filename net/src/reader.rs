//! A bounds-checked cursor over a byte slice, shared by the MQTT codec and the cluster frame
//! decoder. Every read checks what is left first and fails with the owner's error type (its
//! [`ShortInput`] value) instead of panicking; nothing allocates. Each owner adds its own
//! field types (MQTT strings, varints, cluster lists) in an `impl Reader<'_, ItsError>` next
//! to its decoder.

use std::marker::PhantomData;

/// The error a decoder returns when its input ends before a field does.
pub(crate) trait ShortInput {
    fn short_input() -> Self;
}

/// Cursor over one packet or frame body.
pub(crate) struct Reader<'a, E> {
    buf: &'a [u8],
    pos: usize,
    error: PhantomData<fn() -> E>,
}

impl<'a, E: ShortInput> Reader<'a, E> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            error: PhantomData,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        debug_assert!(self.pos <= self.buf.len());
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        if self.remaining() < n {
            return Err(E::short_input());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, E> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, E> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, E> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, E> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Short;

    impl ShortInput for Short {
        fn short_input() -> Self {
            Short
        }
    }

    #[test]
    fn a_read_past_the_end_fails_with_the_owners_error_and_consumes_nothing() {
        let mut r = Reader::<Short>::new(&[0x01, 0x02, 0x03]);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u16(), Err(Short));
        assert_eq!(r.u32(), Err(Short));
        assert_eq!(r.take(usize::MAX), Err(Short));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.u8(), Ok(0x03));
        assert_eq!(r.u8(), Err(Short));
        assert_eq!(r.rest(), &[] as &[u8]);
    }
}
