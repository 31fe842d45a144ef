//! The ECAPA-TDNN speaker encoder inside the DiT.
