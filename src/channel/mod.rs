//! The channel protocol: what a payment institution sends and receives.
//!
//! Owns: the wire format (`message`), the digital envelope for sensitive fields (`envelope`)
//! and the result codes (`codes`). Pure: no I/O here, so every rule is testable without a
//! network; the HTTPS listener and the flows call into it.
//! Must never: act on a message before its signature has been verified over the exact bytes
//! received, or let a sensitive field's plaintext outlive the request.

pub mod codes;
pub mod envelope;
pub mod message;
