"""The fleet's X.509 PKI for the broker link: a CA, client identities, a mosquitto mTLS + ACL config.

Signatures (``fleetops.signer``) protect what a document says; this package protects who may
connect and which topics each connection may touch. The broker requires a client certificate
from this CA and takes the certificate's CN as the MQTT user name, so the ACL's ``%u`` pins
every device to its own topics (``mosquitto``), and only the release service's certificate
may publish releases, rollouts, feature releases and artifacts.

Layout of a CA directory (``cloud-batch pki init --out DIR``)::

    DIR/ca.pem          the CA certificate (give it to devices and the broker)
    DIR/ca.key          its P-256 private key, mode 0600 (keep this directory offline)
    DIR/index.json      every CN issued, with its kind (device/service/broker), fleet and serial
    DIR/devices/ID/     ID.pem, ID.key (0600), ca.pem: what one device needs (default --out)
    DIR/services/NAME/  the same for a cloud service identity

Modules: ``certs`` (keys, the CA, issuing, the index), ``mosquitto`` (broker config and ACL).
"""

from __future__ import annotations

from cloud_batch.pki.certs import Issued, init_ca, issue_device, issue_service
from cloud_batch.pki.mosquitto import BrokerFiles, acl_text, write_broker_config

__all__ = ["BrokerFiles", "Issued", "acl_text", "init_ca", "issue_device", "issue_service", "write_broker_config"]
